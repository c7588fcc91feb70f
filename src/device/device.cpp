#include "tandem/device/device.h"

#include <dlfcn.h>
#include <sched.h>
#include <malloc.h>

#include <cstdlib>

#include <algorithm>
#include <filesystem>
#include <thread>

#include <torch/cuda.h>

#include "tandem/config.h"
#include "tandem/device/policy.h"
#include "tandem/util/check.h"

#if TANDEM_HAVE_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace tandem::device {

int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

int cuda_device_count() { return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0; }

int64_t free_memory_bytes(const c10::Device& device) {
  if (!device.is_cuda()) return 0;
#if TANDEM_HAVE_CUDA
  c10::cuda::CUDAGuard guard(device);
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: it is not the training's error
    return 0;
  }
  return static_cast<int64_t>(free);
#else
  return 0;
#endif
}

int64_t used_memory_bytes(const c10::Device& device) {
  if (!device.is_cuda()) return -1;
#if TANDEM_HAVE_CUDA
  c10::cuda::CUDAGuard guard(device);
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return static_cast<int64_t>(total - free);
#else
  return -1;
#endif
}

BlasInfo blas_info() {
  BlasInfo b;
  // The library that provides sgemm_ to this process: the one LibTorch calls.
  // Several may be mapped (an optimized liblapack pulls in its own BLAS), so
  // ask the dynamic linker which one the symbol resolves to.
  if (void* sym = dlsym(RTLD_DEFAULT, "sgemm_")) {
    Dl_info info{};
    if (dladdr(sym, &info) && info.dli_fname) {
      std::error_code ec;
      auto real = std::filesystem::canonical(info.dli_fname, ec);
      b.path = ec ? std::string(info.dli_fname) : real.string();
    }
  }
  // Debian installs the reference implementation as <libdir>/blas/libblas.so.3;
  // the optimized ones live in openblas-*/, blis-*/, atlas/ or intel64/.
  b.reference = b.path.find("/blas/libblas.so") != std::string::npos;
  return b;
}

std::string BlasInfo::describe() const {
  if (path.empty()) return "no library provides sgemm_ (this LibTorch uses its own matrix kernels)";
  return path + (reference ? " (the netlib reference BLAS: slow)" : "");
}

const char* blas_fix() {
  return "install an optimized BLAS: `sudo apt-get install libopenblas0-openmp` (Debian switches libblas.so.3 to it; "
         "scripts/deps.sh does this)";
}

std::string tune_host_allocator() {
#if defined(__GLIBC__)
  for (const char* v : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"})
    if (std::getenv(v)) return std::string("glibc malloc as configured by ") + v;
  const char* off = std::getenv("TANDEM_MALLOC_TUNING");
  if (off && std::string(off) == "0") return "glibc malloc defaults (TANDEM_MALLOC_TUNING=0)";
  const int gib = 1 << 30;
  if (mallopt(M_MMAP_THRESHOLD, gib) == 1 && mallopt(M_TRIM_THRESHOLD, gib) == 1)
    return "glibc malloc keeps freed memory (mmap and trim thresholds 1 GiB)";
  return "glibc malloc defaults (mallopt refused the thresholds)";
#else
  return "the C library's allocator, untouched";
#endif
}

c10::Device parse(const std::string& spec, const std::string& flag, int local_rank) {
  std::string s = spec;
  if (s == "auto") s = cuda_device_count() > 0 ? "cuda" : "cpu";
  if (!s.empty() && std::all_of(s.begin(), s.end(), ::isdigit)) s = "cuda:" + s;
  if (s == "cpu") return c10::Device(c10::kCPU);
  TANDEM_CHECK(s.rfind("cuda", 0) == 0, flag, " ", spec, ": unknown device; use cpu, cuda, cuda:N or auto");
  int index = -1;
  if (s.size() > 4) {
    TANDEM_CHECK(s[4] == ':' && s.size() > 5 && std::all_of(s.begin() + 5, s.end(), ::isdigit), flag, " ", spec,
                 ": malformed device; use cpu, cuda or cuda:N");
    index = std::stoi(s.substr(5));
  }
  const int n = cuda_device_count();
  TANDEM_CHECK(n > 0, flag, " ", spec, ": this machine has no CUDA device (or this LibTorch was built without CUDA); "
               "use cpu, or run `tandem doctor` to see what is missing");
  std::string list;
  for (int i = 0; i < n; ++i) list += (i ? ", cuda:" : "cuda:") + std::to_string(i);
  if (index < 0) index = std::max(0, local_rank) % n;
  TANDEM_CHECK(index < n, flag, " ", spec, ": no such device: this machine has ", n, " CUDA device",
               n == 1 ? "" : "s", ": ", list);
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

std::string Plan::describe() const {
  const std::string why = reason.empty() ? "" : " (" + reason + ")";
  if (dual) return "dual-device: data on " + data.str() + ", model on " + model.str() + why;
  return "single-device buffered: data and model on " + model.str() + why;
}

Plan plan(const std::string& data_spec, const std::string& model_spec, int local_rank) {
  Plan p;
  if (model_spec == "auto") p.reason = choose_device(model_spec, "--model-device", local_rank).reason;
  if (!model_spec.empty()) p.model = parse(model_spec, "--model-device", local_rank);
  if (!data_spec.empty()) p.data = parse(data_spec, "--data-device", local_rank);
  else p.data = c10::Device(c10::kCPU);
  if (model_spec.empty() && !data_spec.empty()) p.model = p.data;
  p.dual = p.data != p.model;
  return p;
}

}  // namespace tandem::device
