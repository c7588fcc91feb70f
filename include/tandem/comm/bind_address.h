#pragma once
// Which local address a rank's Gloo device binds to in a multi-host job.
//
// Gloo tells its peers the address it is bound to, so that address must be one
// the other hosts can reach. The host name often resolves to loopback (Debian
// puts it on 127.0.1.1), so binding "wherever the host name points" makes rank
// 0 dial 127.0.0.1 for a rank on another host. choose_bind_address() picks,
// first match wins:
//   1. explicit_addr (TANDEM_BIND_ADDR or --bind-addr, read by the caller);
//      a host name is resolved to its first address;
//   2. GLOO_SOCKET_IFNAME (PyTorch's convention; read here through getenv):
//      the first IPv4 address of that interface (the first global IPv6 one
//      when it has no IPv4 address); with a comma-separated list, the first;
//   3. 127.0.0.1 when master_addr is empty or loopback (127.x, ::1, localhost);
//   4. the local address of the route towards master_addr: master_addr is
//      resolved with getaddrinfo, a UDP socket is connected to it (nothing is
//      sent) and getsockname() reads the source address the kernel chose.
// The result also carries one line for the log saying why.
//
// Called by comm::init_from_env() (rendezvous.cpp) when ranks meet through a
// TCPStore. Plain POSIX (getifaddrs, getaddrinfo, socket/connect/getsockname);
// no LibTorch. Thread-safe as long as no one changes the environment meanwhile.
//
// Throws tandem::Error, naming the thing to fix, when GLOO_SOCKET_IFNAME names
// no interface (the existing ones are listed) or one without a usable address,
// when explicit_addr or master_addr cannot be resolved, and when no route
// leads to master_addr.
#include <string>

namespace tandem::comm {

struct BindChoice {
  std::string address;  // numeric IPv4/IPv6 address for Gloo to bind to
  std::string reason;   // one line for the log, e.g. "route to 10.77.0.1 leaves from 10.77.0.2 (veth1)"
};

BindChoice choose_bind_address(const std::string& master_addr, const std::string& explicit_addr);

}  // namespace tandem::comm
