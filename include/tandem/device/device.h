#pragma once
// Devices: parsing, checks with remedies, and the data/model device plan.
#include <cstdint>
#include <string>

#include <c10/core/Device.h>

namespace tandem::device {

// "cpu", "cuda", "cuda:N" (also a bare index N, for the seeds' --data-gpu N),
// or "auto": "cuda" when LibTorch sees a CUDA device, else "cpu"
// (policy.h's choose_device says why). A bare "cuda" is cuda:(local_rank mod
// devices), so the local ranks of a job spread over the host's GPUs. Throws tandem::Error naming the flag, e.g.
// "--model-device cuda:3: this machine has 1 CUDA device: cuda:0".
c10::Device parse(const std::string& spec, const std::string& flag, int local_rank = 0);

int cuda_device_count();

// The CPUs this process may run on (its affinity mask: taskset, cgroups'
// cpusets), at least 1. The default intra-op thread count of serve and bench
// infer: LibTorch's own default counts physical cores, which a VM may report
// as fewer than its vCPUs (one here, for two).
int usable_cpus();

// Free memory of a CUDA device now (cudaMemGetInfo, which counts what other
// processes hold); 0 for the CPU or in a build without CUDA.
int64_t free_memory_bytes(const c10::Device& device);
// Memory of a CUDA device in use now (total - free, every process's); -1 for
// the CPU or in a build without CUDA.
int64_t used_memory_bytes(const c10::Device& device);

// The BLAS library this process loaded (LibTorch's CPU matrix multiplies, so
// every linear layer, go through it), as the dynamic linker resolved sgemm_. Debian's
// default libblas.so.3 is the netlib reference implementation, which runs a
// 64x3136x128 matrix multiply at about 4 GFLOP/s on one core here against
// 50-95 with OpenBLAS: a cnn step on Fashion-MNIST is twice as slow with it.
struct BlasInfo {
  std::string path;        // the file that provides sgemm_, symlinks resolved; empty if none
  bool reference = false;  // the netlib reference BLAS
  std::string describe() const;
};
BlasInfo blas_info();
// One line telling how to install an optimized BLAS (the Debian package).
const char* blas_fix();

// Keeps glibc's malloc from handing tensor memory back to the kernel after
// every step. By default a block above the mmap threshold (128 KiB, rising
// with use to at most 32 MiB) is a fresh mmap per allocation, and free heap
// above the trim threshold is returned, so each step faults its activations
// in again. On this VM a page fault costs about 7 us: the cnn at batch 256
// ran at 851 img/s with 610k faults per 10k images, and at 2810 img/s with
// both thresholds at 1 GiB. Leaves things alone when the user has set
// MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or
// GLIBC_TUNABLES, or TANDEM_MALLOC_TUNING=0. Returns what it did, for logs;
// calling it again changes nothing and returns the same.
// The tandem CLI calls it at start; a library user decides for their process.
std::string tune_host_allocator();

struct Plan {
  c10::Device data{c10::kCPU};
  c10::Device model{c10::kCPU};
  bool dual = false;  // data and model on different devices
  std::string reason;  // --model-device auto: what it chose and why
  std::string describe() const;
};

// Neither given: single-device buffered mode on the CPU. Only the model
// device given: the data device is the CPU (dual mode when that is a GPU);
// only the data device given: the model goes there too.
Plan plan(const std::string& data_spec, const std::string& model_spec, int local_rank = 0);

}  // namespace tandem::device
