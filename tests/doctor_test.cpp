// `tandem doctor` on this machine: CPU checks pass, CUDA is reported as not
// available (not a crash), a bad device request fails with its reason.
#include <gtest/gtest.h>

#include <string>

#include "run_tandem.h"


TEST(Doctor, CpuChecksPassWithRanks) {
  auto [code, out] = run_tandem("doctor --nproc 2");
  EXPECT_EQ(code, 0) << out;
  for (const char* line : {"[PASS] LibTorch", "[PASS] requested devices", "[PASS] model on the model device",
                           "[PASS] transfer cpu -> cpu", "[PASS] simulated pipeline", "[PASS] rendezvous + all-reduce"})
    EXPECT_NE(out.find(line), std::string::npos) << line << "\n" << out;
  EXPECT_NE(out.find("c10d Gloo: yes"), std::string::npos) << out;
  EXPECT_NE(out.find("all-reduce of 4 MiB across 2 ranks: correct"), std::string::npos) << out;
  EXPECT_NE(out.find("all checks passed"), std::string::npos) << out;
}

TEST(Doctor, MissingCudaIsReportedNotCrashed) {
  auto [code, out] = run_tandem("doctor --data-device cpu --model-device cuda:0");
  // On a CPU-only machine: CUDA is "n/a", the requested device fails with the reason.
  if (out.find("[n/a ] CUDA devices") != std::string::npos) {
    EXPECT_EQ(code, 1) << out;
    EXPECT_NE(out.find("[FAIL] requested devices"), std::string::npos) << out;
    EXPECT_NE(out.find("no CUDA device"), std::string::npos) << out;
  } else {
    EXPECT_EQ(code, 0) << out;  // a CUDA machine: the dual-device path must pass
  }
}

// main() raises glibc's mmap and trim thresholds unless the user configured
// malloc (or turned the tuning off); doctor reports which happened.
TEST(Doctor, HostAllocatorTuningYieldsToTheUsersSettings) {
  const std::string clean = "env -u GLIBC_TUNABLES -u MALLOC_MMAP_THRESHOLD_ -u MALLOC_TRIM_THRESHOLD_ "
                            "-u MALLOC_TOP_PAD_ -u TANDEM_MALLOC_TUNING ";
  auto doctor = [&](const std::string& env) {
    std::string cmd = clean + env + " " + TANDEM_EXE + " doctor 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    pclose(p);
    return out;
  };
  std::string out = doctor("");
  EXPECT_NE(out.find("host allocator                     glibc malloc keeps freed memory (mmap and trim "
                     "thresholds 1 GiB)"),
            std::string::npos)
      << out;
  out = doctor("TANDEM_MALLOC_TUNING=0");
  EXPECT_NE(out.find("glibc malloc defaults (TANDEM_MALLOC_TUNING=0)"), std::string::npos) << out;
  out = doctor("MALLOC_TRIM_THRESHOLD_=131072");
  EXPECT_NE(out.find("glibc malloc as configured by MALLOC_TRIM_THRESHOLD_"), std::string::npos) << out;
}
