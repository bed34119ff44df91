#!/usr/bin/env bash
# On a CUDA machine: the in-backward loop's step time against torch AdamW fused's loop, GPT-2 124M and 1.5B,
# the table's batch (2 x 512) and a batch that keeps the GPU busy (8 x 512), buckets of 25 and 200 MB, 8-bit
# moments; BATCHES, BUCKETS, PRECISIONS (int8, param), SIZES (124m, 1p5b) and ROUNDS choose others.
# One JSON per setting under $OUT (default benchmarks/results/step_time_sweep). Run from the repository root.
set -u
OUT=${OUT:-benchmarks/results/step_time_sweep}
mkdir -p "$OUT"
declare -A shape=([124m]="12 768 12" [1p5b]="48 1600 25")
for size in ${SIZES:-124m 1p5b}; do
  set -- ${shape[$size]}
  for batch in ${BATCHES:-2 8}; do
    for mb in ${BUCKETS:-25 200}; do
     for precision in ${PRECISIONS:-int8}; do
      name="${size}_b${batch}_mb${mb}_${precision}"
      timeout 300 python3 benchmarks/memory/profile_in_backward.py --n-layer "$1" --n-embd "$2" --n-head "$3" \
        --batch "$batch" --bucket-mb "$mb" --state-precision "$precision" --rounds "${ROUNDS:-5}" --no-profile \
        --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || tail -n 5 "$OUT/$name.log"
      python3 - "$OUT/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t, o = r["torch"], r["ours-bwd"]
ratios = sorted(a / b for a, b in zip(t["ms_per_round"], o["ms_per_round"]))
print(sys.argv[1].split("/")[-1], "torch %.1f ms, ours %.1f ms, speed ratio median %.3f (rounds %.3f-%.3f),"
      " host bwd+step torch %.1f ours %.1f ms" % (t["ms_per_step"], o["ms_per_step"], ratios[len(ratios) // 2],
      ratios[0], ratios[-1], t["host_ms_backward"] + t["host_ms_step"], o["host_ms_backward"] + o["host_ms_step"]))
PY
     done
    done
  done
done
