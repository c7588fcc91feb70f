// comm::choose_bind_address: which local address Gloo binds to in a multi-host
// job (explicit address, GLOO_SOCKET_IFNAME, loopback, route to the master).
// The two-hosts-in-namespaces case is tests/netns_test.sh.
#include <gtest/gtest.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <sys/socket.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>
#include <string>

#include "tandem/comm/bind_address.h"
#include "tandem/comm/env.h"
#include "tandem/util/check.h"

namespace {

using tandem::comm::BindChoice;
using tandem::comm::choose_bind_address;
using tandem::env::kGlooSocketIfname;

// Sets (or unsets) GLOO_SOCKET_IFNAME for one test and restores it afterwards.
class IfnameEnv {
 public:
  explicit IfnameEnv(const char* value) {
    if (const char* v = std::getenv(kGlooSocketIfname)) saved_ = v;
    if (value)
      setenv(kGlooSocketIfname, value, 1);
    else
      unsetenv(kGlooSocketIfname);
  }
  ~IfnameEnv() {
    if (saved_)
      setenv(kGlooSocketIfname, saved_->c_str(), 1);
    else
      unsetenv(kGlooSocketIfname);
  }

 private:
  std::optional<std::string> saved_;
};

std::string error_of(const std::string& master, const std::string& explicit_addr) {
  try {
    BindChoice c = choose_bind_address(master, explicit_addr);
    return "no error (chose " + c.address + ": " + c.reason + ")";
  } catch (const tandem::Error& e) {
    return e.what();
  }
}

// Every address (numeric, without IPv6 scope) on this host's interfaces.
std::set<std::string> local_addresses() {
  std::set<std::string> out;
  ifaddrs* head = nullptr;
  if (getifaddrs(&head) != 0) return out;
  for (ifaddrs* i = head; i; i = i->ifa_next) {
    if (!i->ifa_addr || (i->ifa_addr->sa_family != AF_INET && i->ifa_addr->sa_family != AF_INET6)) continue;
    char host[NI_MAXHOST];
    socklen_t len = i->ifa_addr->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    if (getnameinfo(i->ifa_addr, len, host, sizeof host, nullptr, 0, NI_NUMERICHOST) == 0) {
      std::string a = host;
      out.insert(a.substr(0, a.find('%')));
    }
  }
  freeifaddrs(head);
  return out;
}

// Interface of the IPv4 default route (/proc/net/route), or "" when there is none.
std::string default_route_interface() {
  std::ifstream in("/proc/net/route");
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string iface, dest, gateway;
    unsigned flags = 0;
    f >> iface >> dest >> gateway >> std::hex >> flags;
    if (dest == "00000000" && (flags & 0x1)) return iface;  // RTF_UP
  }
  return "";
}

TEST(BindAddress, LoopbackOrNoMasterBindsLoopback) {
  IfnameEnv unset(nullptr);
  for (const std::string m : {"127.0.0.1", "localhost", "127.0.1.1", "::1", ""}) {
    BindChoice c = choose_bind_address(m, "");
    EXPECT_EQ(c.address, "127.0.0.1") << "master '" << m << "': " << c.reason;
    EXPECT_FALSE(c.reason.empty());
  }
}

TEST(BindAddress, ExplicitAddressWins) {
  IfnameEnv set("lo");
  BindChoice c = choose_bind_address("10.77.0.1", "10.1.2.3");
  EXPECT_EQ(c.address, "10.1.2.3");
  EXPECT_NE(c.reason.find("10.1.2.3"), std::string::npos) << c.reason;
  // Not on this host: said in the log line, left to Gloo to refuse.
  EXPECT_NE(c.reason.find("not an address of this host"), std::string::npos) << c.reason;
  // A host name is resolved to a numeric address.
  EXPECT_EQ(choose_bind_address("10.77.0.1", "localhost").address.rfind("127.", 0), 0u);
}

TEST(BindAddress, GlooSocketIfnameLoBinds127) {
  IfnameEnv set("lo");
  // Wins over the loopback rule and over the route to the master.
  BindChoice c = choose_bind_address("192.0.2.77", "");
  EXPECT_EQ(c.address, "127.0.0.1") << c.reason;
  EXPECT_NE(c.reason.find("GLOO_SOCKET_IFNAME=lo"), std::string::npos) << c.reason;
}

TEST(BindAddress, UnknownInterfaceIsAnErrorNamingItAndTheExistingOnes) {
  IfnameEnv set("tandem-no-such-if0");
  const std::string e = error_of("127.0.0.1", "");
  EXPECT_NE(e.find("GLOO_SOCKET_IFNAME=tandem-no-such-if0"), std::string::npos) << e;
  EXPECT_NE(e.find("lo"), std::string::npos) << "should list the existing interfaces: " << e;
}

TEST(BindAddress, UnresolvableMasterIsAnErrorNamingIt) {
  IfnameEnv unset(nullptr);
  const std::string e = error_of("tandem-no-such-host.invalid", "");
  EXPECT_NE(e.find("'tandem-no-such-host.invalid'"), std::string::npos) << e;
}

TEST(BindAddress, RouteToMasterLeavesFromALocalAddress) {
  IfnameEnv unset(nullptr);
  const std::string iface = default_route_interface();
  if (iface.empty())
    GTEST_SKIP() << "no IPv4 default route on this host (/proc/net/route): the route-to-master case is not "
                    "exercised here (tests/netns_test.sh covers it with two namespaces)";
  BindChoice c = choose_bind_address("8.8.8.8", "");
  std::cout << "[ route    ] " << c.address << ": " << c.reason << "\n";
  EXPECT_EQ(local_addresses().count(c.address), 1u) << c.address << " is not on a local interface (" << c.reason << ")";
  EXPECT_NE(c.address, "127.0.0.1");
  EXPECT_NE(c.reason.find("route to 8.8.8.8 leaves from " + c.address), std::string::npos) << c.reason;
}

}  // namespace
