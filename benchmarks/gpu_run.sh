#!/usr/bin/env bash
# On a CUDA machine: install the checkout, run the whole test suite on the GPU, then the GPU
# benchmarks (theta/, pi/, step/). Logs and JSON go to $OUT (default benchmarks/results). Run from the
# repository root.
# Usage: bash benchmarks/gpu_run.sh [tests|bench|all|object|distributed]; "object": the one-weight-per-sample
# benchmarks (the sample programs' tiles; the iteration eager, captured one per replay and 20 per replay at
# 10^3-10^8 with each kernel's time; the iteration at 10^9; one plot of both; about 6 minutes on an H100);
# "distributed" needs 2+ GPUs: the DDP and FSDP2 tests with NCCL and the Triton kernels, then one DDP and one
# FSDP2 training step timed.
set -u
what=${1:-all}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  echo "editable install failed (see install.log); importing from the checkout instead"
  ln -sfn ../kernels also_fused/kernels
  export PYTHONPATH=$PWD
fi
python3 -c "import torch, triton, also_fused; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# the C++ extension is built by the install above; its tests (on CPU tensors) run here too
python3 -c "from also_fused import cpu_fused; print('CPU extension:', cpu_fused.available())"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # one CPU thread per worker: 16 workers each running OpenMP and torch on every core oversubscribe
  # the host many times over and the CPU-extension tests then take minutes instead of seconds
  workers=${WORKERS:-16}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))}
  timeout "${TEST_TIMEOUT:-900}" python3 -m pytest -q -rs -n "$workers" -p no:cacheprovider -o faulthandler_timeout=120 ${TESTS:-tests} \
    > "$OUT/tests.log" 2>&1
  status=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 240 python3 benchmarks/theta/bench_theta.py --out "$OUT/theta.json" > "$OUT/theta.log" 2>&1; tail -n 40 "$OUT/theta.log"
  timeout 90 python3 benchmarks/pi/bench_pi.py --out "$OUT/pi.json" > "$OUT/pi.log" 2>&1; tail -n 25 "$OUT/pi.log"
  timeout 150 python3 benchmarks/step/bench_step.py --out "$OUT/step.json" 2>&1 | tail -n 30
fi
if [ "$what" = object ]; then
  timeout 200 python3 benchmarks/pi/bench_sample_tile.py --out "$OUT/pi_sample_tile.json" > "$OUT/sample_tile.log" 2>&1
  tail -n 1 "$OUT/sample_tile.log"
  timeout 330 python3 benchmarks/pi/bench_object_level.py --graph --graph-block 20 --kernel-times \
    --sizes 1e3,1e4,1e5,1e6,1e7,1e8 --rounds 5 --out "$OUT/object_level_graph.json" > "$OUT/object_level_graph.log" 2>&1
  tail -n 13 "$OUT/object_level_graph.log" | cut -c1-300
  timeout 150 python3 benchmarks/pi/bench_object_level.py --sizes 1e9 --iters 5 --rounds 5 \
    --out "$OUT/object_level_1e9.json" > "$OUT/object_level_1e9.log" 2>&1
  tail -n 3 "$OUT/object_level_1e9.log" | cut -c1-300
  python3 benchmarks/pi/plot_object_level.py "$OUT/object_level_graph.json" "$OUT/object_level_1e9.json" \
    --out "$OUT/object_level_sweep.png"
fi
if [ "$what" = distributed ]; then
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  n=$(python3 -c "import torch; print(torch.cuda.device_count())")
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_distributed.py tests/test_fsdp.py > "$OUT/distributed_tests.log" 2>&1
  status=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/distributed_tests.log" | tail -n 20
  for wrap in ddp fsdp2; do
    timeout 150 torchrun --nproc-per-node="$n" benchmarks/distributed/bench_ddp.py --wrap $wrap \
      --out "$OUT/${wrap}_step.json" > "$OUT/bench_${wrap}.log" 2>&1 || status=1
    tail -n 6 "$OUT/bench_${wrap}.log"
  done
fi
exit $status
