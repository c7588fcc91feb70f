#include "tandem/comm/bind_address.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "tandem/comm/env.h"
#include "tandem/util/check.h"

namespace tandem::comm {
namespace {

// Numeric form of a socket address ("10.77.0.2", "fd00::2", "fe80::1%eth0"); empty on failure.
std::string numeric(const sockaddr* sa) {
  if (!sa) return "";
  socklen_t len = sa->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  char host[NI_MAXHOST];
  if (getnameinfo(sa, len, host, sizeof host, nullptr, 0, NI_NUMERICHOST) != 0) return "";
  return host;
}

std::string without_scope(const std::string& a) { return a.substr(0, a.find('%')); }

struct IfAddrs {
  ifaddrs* head = nullptr;
  IfAddrs() {
    if (getifaddrs(&head) != 0) head = nullptr;
  }
  ~IfAddrs() {
    if (head) freeifaddrs(head);
  }
  IfAddrs(const IfAddrs&) = delete;
  IfAddrs& operator=(const IfAddrs&) = delete;
};

// Name of the local interface that holds `address`, or "" when none does.
std::string interface_holding(const std::string& address) {
  IfAddrs ifs;
  const std::string want = without_scope(address);
  for (ifaddrs* i = ifs.head; i; i = i->ifa_next) {
    if (!i->ifa_addr || (i->ifa_addr->sa_family != AF_INET && i->ifa_addr->sa_family != AF_INET6)) continue;
    if (without_scope(numeric(i->ifa_addr)) == want) return i->ifa_name;
  }
  return "";
}

std::string interface_list() {
  std::string out;
  if (struct if_nameindex* names = if_nameindex()) {
    for (struct if_nameindex* n = names; n->if_index != 0 && n->if_name; ++n) {
      if (!out.empty()) out += ", ";
      out += n->if_name;
    }
    if_freenameindex(names);
  }
  return out.empty() ? "none found" : out;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string trim(const std::string& s) {
  auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

bool is_loopback(const std::string& addr) {
  const std::string a = lower(addr);
  if (a == "localhost" || a == "localhost.localdomain" || a == "ip6-localhost" || a == "ip6-loopback") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, a.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, a.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

struct AddrInfo {
  addrinfo* head = nullptr;
  int rc = 0;
  AddrInfo(const std::string& name, int flags) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = flags;
    rc = getaddrinfo(name.c_str(), nullptr, &hints, &head);
    if (rc != 0) head = nullptr;
  }
  ~AddrInfo() {
    if (head) freeaddrinfo(head);
  }
  AddrInfo(const AddrInfo&) = delete;
  AddrInfo& operator=(const AddrInfo&) = delete;
  std::string error() const { return rc == EAI_SYSTEM ? std::strerror(errno) : gai_strerror(rc); }
  // IPv4 results first (what Gloo and the TCPStore are mostly given), each once.
  std::vector<const addrinfo*> ordered() const {
    std::vector<const addrinfo*> out;
    for (int family : {AF_INET, AF_INET6})
      for (const addrinfo* a = head; a; a = a->ai_next)
        if (a->ai_family == family && a->ai_addr) out.push_back(a);
    return out;
  }
};

BindChoice from_explicit(const std::string& given) {
  std::string address;
  {
    AddrInfo numeric_only(given, AI_NUMERICHOST);
    if (numeric_only.rc == 0) {
      address = given;
    } else {
      AddrInfo ai(given, 0);
      TANDEM_CHECK(ai.rc == 0 && !ai.ordered().empty(), "cannot resolve the bind address '", given,
                   "' (TANDEM_BIND_ADDR or --bind-addr): ", ai.rc ? ai.error() : "no IPv4/IPv6 address",
                   "; give a numeric address of this host");
      address = numeric(ai.ordered().front()->ai_addr);
      TANDEM_CHECK(!address.empty(), "cannot turn the bind address '", given, "' into a numeric address");
    }
  }
  std::string reason = std::string(env::kBindAddr) + " / --bind-addr gives " + given;
  if (address != given) reason += " = " + address;
  const std::string iface = interface_holding(address);
  reason += iface.empty() ? " (not an address of this host's interfaces: Gloo may fail to bind)" : " (" + iface + ")";
  return {address, reason};
}

BindChoice from_interface(const std::string& value) {
  std::string name = trim(value);
  std::string note;
  if (auto comma = name.find(','); comma != std::string::npos) {
    name = trim(name.substr(0, comma));
    note = " (first of the list '" + value + "')";
  }
  TANDEM_CHECK(!name.empty(), env::kGlooSocketIfname, "='", value, "' names no interface; interfaces on this host: ",
               interface_list());
  TANDEM_CHECK(if_nametoindex(name.c_str()) != 0, env::kGlooSocketIfname, "=", name,
               ": no network interface of that name on this host (interfaces: ", interface_list(),
               "); set it to one of them, or unset it");
  IfAddrs ifs;
  std::string v4, v6, others;
  bool up = false;
  for (ifaddrs* i = ifs.head; i; i = i->ifa_next) {
    if (!i->ifa_name || name != i->ifa_name || !i->ifa_addr) continue;
    up = up || (i->ifa_flags & IFF_UP);
    const int family = i->ifa_addr->sa_family;
    if (family == AF_INET && v4.empty()) {
      v4 = numeric(i->ifa_addr);
    } else if (family == AF_INET6) {
      const auto* s6 = reinterpret_cast<const sockaddr_in6*>(i->ifa_addr);
      const std::string a = numeric(i->ifa_addr);
      if (v6.empty() && !IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr)) {
        v6 = a;
      } else {
        others += (others.empty() ? "" : ", ") + a;
      }
    }
  }
  const std::string address = !v4.empty() ? v4 : v6;
  TANDEM_CHECK(!address.empty(), env::kGlooSocketIfname, "=", name, ": the interface has no IPv4 (or global IPv6) address",
               others.empty() ? std::string() : " (only link-local: " + others + ")",
               "; give it one, pick another interface (", interface_list(), "), or set ", env::kBindAddr);
  std::string reason = std::string(env::kGlooSocketIfname) + "=" + name + note + ": " + address;
  if (v4.empty()) reason += " (no IPv4 address, first global IPv6)";
  if (!up) reason += " (interface is down)";
  return {address, reason};
}

BindChoice from_route(const std::string& master) {
  AddrInfo ai(master, 0);
  TANDEM_CHECK(ai.rc == 0, "cannot resolve the master address '", master, "': ", ai.error(),
               "; check --master-addr / MASTER_ADDR, or choose the local address with ", env::kBindAddr, " or ",
               env::kGlooSocketIfname);
  std::string tried;
  for (const addrinfo* a : ai.ordered()) {
    const std::string target = numeric(a->ai_addr);
    sockaddr_storage to{};
    std::memcpy(&to, a->ai_addr, a->ai_addrlen);
    // Any port will do: connect() on a UDP socket only picks a route, nothing is sent.
    if (to.ss_family == AF_INET) reinterpret_cast<sockaddr_in*>(&to)->sin_port = htons(9);
    if (to.ss_family == AF_INET6) reinterpret_cast<sockaddr_in6*>(&to)->sin6_port = htons(9);
    const int fd = socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    std::string why;
    std::string local;
    if (fd < 0) {
      why = std::string("socket: ") + std::strerror(errno);
    } else {
      sockaddr_storage me{};
      socklen_t len = sizeof me;
      if (connect(fd, reinterpret_cast<const sockaddr*>(&to), a->ai_addrlen) != 0) {
        why = std::strerror(errno);
      } else if (getsockname(fd, reinterpret_cast<sockaddr*>(&me), &len) != 0) {
        why = std::string("getsockname: ") + std::strerror(errno);
      } else {
        local = numeric(reinterpret_cast<const sockaddr*>(&me));
        if (local.empty()) why = "no numeric form of the local address";
      }
      close(fd);
    }
    if (!local.empty()) {
      std::string reason = "route to " + master;
      if (without_scope(target) != master) reason += " (" + target + ")";
      const std::string iface = interface_holding(local);
      reason += " leaves from " + local + (iface.empty() ? "" : " (" + iface + ")");
      return {local, reason};
    }
    tried += (tried.empty() ? "" : "; ") + target + ": " + why;
  }
  TANDEM_FAIL("no route from this host to the master address '", master, "' (tried ",
              tried.empty() ? std::string("no IPv4/IPv6 address") : tried,
              "); check --master-addr / MASTER_ADDR and this host's routes (`ip route`), or choose the local address "
              "with ",
              env::kBindAddr, " or ", env::kGlooSocketIfname);
}

}  // namespace

BindChoice choose_bind_address(const std::string& master_addr, const std::string& explicit_addr) {
  if (!explicit_addr.empty()) return from_explicit(explicit_addr);
  if (const char* ifname = std::getenv(env::kGlooSocketIfname); ifname && *ifname) return from_interface(ifname);
  if (master_addr.empty()) return {"127.0.0.1", "no master address (single host): 127.0.0.1"};
  if (is_loopback(master_addr)) return {"127.0.0.1", "master address " + master_addr + " is loopback: 127.0.0.1"};
  return from_route(master_addr);
}

}  // namespace tandem::comm
