#!/usr/bin/env bash
# GPU verification: builds tandem against the LibTorch inside this machine's
# PyTorch (CUDA build) with the dependencies from scripts/gpu_deps.sh, then runs
# the CUDA paths: doctor, cpu->cuda and cuda->cuda training, 2 ranks on one GPU
# (Gloo all-reduce of CUDA buckets), NCCL's world of one and --comm auto's choice
# for CUDA models, and ResNet-18 on exported JPEGs.
# Logs and results go to $OUT (default /tmp/tandem-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tandem-gpu}
mkdir -p "$OUT"
deps=$PWD/.gpu
summary=$OUT/summary.txt
: > "$summary"
step() {  # step NAME CMD...: runs, logs to $OUT/NAME.log, records the exit code
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$summary"
  tail -n 4 "$OUT/$name.log"
  return $rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' | tee -a "$summary"
torch_dir=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
gloo=""
[ -d "$torch_dir/include/gloo" ] || gloo="-DTANDEM_GLOO_INCLUDE_DIR=$deps/gloo/usr/include"
echo "gloo headers: ${gloo:-from LibTorch}" | tee -a "$summary"
gen=""; command -v ninja >/dev/null && gen="-G Ninja"
step configure cmake -S . -B build-gpu $gen -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_dir/share/cmake;$deps/root/usr" \
  -DCMAKE_CXX_FLAGS="-isystem $deps/root/usr/include" -DTANDEM_BUILD_TESTS=OFF -DTANDEM_BUILD_BENCHMARKS=OFF \
  -DTANDEM_WITH_CUDA=ON $gloo || { tail -n 40 "$OUT/configure.log"; exit 1; }
step build cmake --build build-gpu -j "$(nproc)" --target tandem_cli || { grep -m 20 -B2 -A6 "error" "$OUT/build.log"; exit 1; }
export LD_LIBRARY_PATH=$deps/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
T=build-gpu/tandem
D="--data-dir $deps/fmnist"
step doctor_cpu_cuda $T doctor --data-device cpu --model-device cuda:0 --nproc 2
step doctor_cuda_cuda $T doctor --data-device cuda:0 --model-device cuda:0
step bad_device $T train --model-device cuda:7 --epochs 1 $D --output ""
step train_cpu_cuda $T train $D --data-device cpu --model-device cuda:0 --epochs 1 --output "$OUT/cpu_cuda.json"
step train_cuda_cuda $T train $D --data-device cuda:0 --model-device cuda:0 --epochs 1 --trace "$OUT/trace_cuda.json" \
  --output "$OUT/cuda_cuda.json"
step train_cuda_static $T train $D --data-device cuda:0 --model-device cuda:0 --static-shapes --batch-size 48 \
  --limit 1000 --val-limit 500 --epochs 1 --output "$OUT/cuda_static.json"
step train_cuda_to_cpu $T train $D --data-device cuda:0 --model-device cpu --limit 2000 --val-limit 500 --epochs 1 \
  --output "$OUT/cuda_to_cpu.json"
step train_2ranks_ddp $T train $D --nproc 2 --model-device cuda:0 --strategy ddp --epochs 1 --output "$OUT/ddp2.json"
step train_2ranks_fp16 $T train $D --nproc 2 --model-device cuda:0 --strategy ddp --compress fp16 --epochs 1 \
  --output "$OUT/ddp2_fp16.json"
# NCCL: a world of one is all one GPU can run (--comm nccl builds ProcessGroupNCCL even for one rank; the epoch's
# sums are CPU tensors staged through the GPU). Then --comm auto for CUDA models: NCCL when every rank has a GPU of
# its own, otherwise shm/gloo with the reason (2 ranks on this 1-GPU machine share it).
step train_nccl_world1 $T train $D --nproc 1 --model-device cuda:0 --comm nccl --epochs 1 --limit 4000 \
  --val-limit 1000 --output "$OUT/nccl1.json"
grep -m1 -o "tandem: communicator .*" "$OUT/train_nccl_world1.log" | tee -a "$summary"
step train_auto_cuda $T train $D --nproc 2 --model-device cuda --comm auto --epochs 1 --limit 4000 \
  --val-limit 1000 --output "$OUT/auto_cuda.json"
grep -m1 -o "tandem: communicator .*" "$OUT/train_auto_cuda.log" | tee -a "$summary"
step buffer_auto_cuda $T train $D --data-device cuda:0 --model-device cuda:0 --buffer-size auto --num-workers 4 \
  --limit 2000 --val-limit 500 --epochs 1 --output "$OUT/buffer_auto.json"
grep -o "buffer auto = [^,]*" "$OUT/buffer_auto_cuda.log" | tee -a "$summary"
# Devices, precision and batch (issue: serving and devices): the CPU-vs-GPU table, fp16 training with its loss
# scaler, and what the policy picks here. (tandem serve itself needs cpp-httplib, not carried in .gpu.)
step bench_infer $T bench infer --models mlp,cnn,resnet18,resnet50 --devices cpu,cuda:0 --batch 1,4,16 \
  --precisions fp32,fp16,bf16 --budget-ms 200 --json "$OUT/infer.json"
step train_fp16 $T train $D --model-device cuda:0 --precision fp16 --epochs 1 --output "$OUT/fp16.json"
step train_bf16_cuda $T train $D --model-device cuda:0 --precision bf16 --epochs 1 --output "$OUT/bf16_cuda.json"
step doctor_policy $T doctor
step export $T data export --dataset fashion-mnist $D --format jpg --out /tmp/fm-jpg --limit 6000
step resnet18 $T train --dataset imagefolder --data-dir /tmp/fm-jpg --model resnet18 --channels 1 --image-size 28 \
  --data-device cpu --model-device cuda:0 --epochs 2 --cache --num-workers 4 --output "$OUT/resnet18.json"
# The pipeline on the GPU: serial loading vs loader workers, and a CUDA data device.
R="--dataset imagefolder --data-dir /tmp/fm-jpg --model resnet18 --channels 1 --image-size 28 --epochs 2"
step resnet18_serial $T train $R --model-device cuda:0 --num-workers 0 --output "$OUT/resnet18_serial.json"
step resnet18_workers8 $T train $R --model-device cuda:0 --num-workers 8 --output "$OUT/resnet18_workers8.json"
step resnet18_cuda_data $T train $R --data-device cuda:0 --model-device cuda:0 --num-workers 8 \
  --trace "$OUT/trace_resnet18.json" --output "$OUT/resnet18_cuda_data.json"
cat "$summary"
tar czf /tmp/tandem-gpu-logs.tgz -C "$OUT" --exclude console.log . && mv /tmp/tandem-gpu-logs.tgz "$OUT/logs.tgz" &&
  find "$OUT" -type f ! -name logs.tgz ! -name console.log -delete  # the device tool returns 8 files at most
