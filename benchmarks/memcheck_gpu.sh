#!/usr/bin/env bash
# On a CUDA machine: install the checkout and run the named GPU test chunk(s) under compute-sanitizer memcheck, one log per chunk in $OUT (default benchmarks/results/memcheck). Usage: bash benchmarks/memcheck_gpu.sh [-j] <chunk>...  (-j: run the chunks at once; `list` prints the chunks)
# Environment: CHUNK_TIMEOUT (seconds a chunk, default 170), OUT, NO_INSTALL=1 (skip the editable install).
set -u
par=0
if [ "${1:-}" = -j ]; then par=1; shift; fi
OUT=${OUT:-benchmarks/results/memcheck}
CHUNK_TIMEOUT=${CHUNK_TIMEOUT:-170}
export PYTHONUNBUFFERED=1

GRAPH_TESTS="tests/test_kernel_multi_tensor_adam.py::test_cuda_graph_capture_matches_eager tests/test_triton_backend.py::test_cuda_graph_capture_of_a_training_step"
API_A="bad_closure or bad_ids or bad_loop or closure_exception or constructor_errors"
GOLDEN_AB="test_variants or test_matrix or test_group_mean_reduction"

# pytest arguments of each chunk
args_of() {
  case "$1" in
    adam)            echo "tests/test_kernel_multi_tensor_adam.py -k 'not 2_pow_31 and not cuda_graph'" ;;
    adam_2p31)       echo "tests/test_kernel_multi_tensor_adam.py::test_tensor_over_2_pow_31_elements" ;;
    group_pi)        echo "tests/test_kernel_group_pi.py" ;;
    triton_backend)  echo "tests/test_triton_backend.py -k 'not cuda_graph'" ;;
    graphs|graphs_cached) echo "$GRAPH_TESTS" ;;
    dropin_determinism) echo "tests/test_adam_dropin.py tests/test_long_runs.py::test_gpu_runs_are_bitwise_deterministic" ;;
    api_a)           echo "tests/test_also_api.py -k '$API_A'" ;;
    api_b)           echo "tests/test_also_api.py -k 'not ($API_A)'" ;;
    golden_variants) echo "tests/test_also_golden.py -k test_variants" ;;
    golden_matrix)   echo "tests/test_also_golden.py -k 'test_matrix or test_group_mean_reduction'" ;;
    golden_rest)     echo "tests/test_also_golden.py -k 'not ($GOLDEN_AB)'" ;;
    props_adam)      echo "tests/test_properties.py::test_multi_tensor_adam_matches_reference" ;;
    props_pi)        echo "tests/test_properties.py::test_pi_update_matches_reference" ;;
    props_wloss)     echo "tests/test_properties.py::test_weighted_loss_matches_reference" ;;
    props_rgd)       echo "tests/test_properties.py::test_rgd_loss_matches_reference" ;;
    badref_opt)      echo "tests/test_bad_input_matrix.py -k 'reference and optimistic'" ;;
    badref_da)       echo "tests/test_bad_input_matrix.py -k 'reference and descent'" ;;
    badtriton)       echo "tests/test_bad_input_matrix.py -k triton" ;;
    losses)          echo "tests/test_kernel_losses.py" ;;
    # the rest of a chunk that hit its time limit (the tests before it had passed)
    group_pi_rest)   echo "tests/test_kernel_group_pi.py -k 'rejects_bad_arguments or large_cuda'" ;;
    triton_backend_rest) echo "tests/test_triton_backend.py -k 'not cuda_graph and not (matches_golden and (default or amsgrad-closure or amsgrad-loop-optimistic))'" ;;
    api_b_rest)      echo "tests/test_also_api.py -k 'not ($API_A) and not (resume_is_bitwise and closure-optimistic)'" ;;
    # the rest of triton_backend_rest and api_b_rest, split smaller
    tb_golden_rest)  echo "tests/test_triton_backend.py -k 'matches_golden and (eps_one_sample-loop or group_mean)'" ;;
    tb_follow_lowprec) echo "tests/test_triton_backend.py -k 'follows_reference or low_precision'" ;;
    tb_dropins_resume_badids) echo "tests/test_triton_backend.py -k 'dropins_match_torch or resume_bitwise_triton or bad_ids_leave'" ;;
    api_resume_rest) echo "tests/test_also_api.py -k 'resume_is_bitwise and (loop-optimistic-True or loop-descent-ascent)'" ;;
    api_misc)        echo "tests/test_also_api.py -k 'not ($API_A) and not resume_is_bitwise'" ;;
    determinism)     echo "tests/test_long_runs.py::test_gpu_runs_are_bitwise_deterministic" ;;
    # the long tests with ALSO_FUSED_SHORT_TESTS=1 (fewer steps and examples, the same code paths)
    short_golden_variants) echo "tests/test_also_golden.py -k test_variants" ;;
    short_golden_matrix) echo "tests/test_also_golden.py -k 'test_matrix or test_group_mean_reduction'" ;;
    short_props_adam) echo "tests/test_properties.py::test_multi_tensor_adam_matches_reference" ;;
    short_determinism) echo "tests/test_long_runs.py::test_gpu_runs_are_bitwise_deterministic" ;;
    short_simplex)   echo "tests/test_kernel_group_pi.py -k stays_on_simplex_long" ;;
    short_long_runs) echo "tests/test_long_runs.py -k 'not deterministic and not reference'" ;;
    tb_last)         echo "tests/test_triton_backend.py -k 'resume_bitwise_triton and loop-descent-ascent or bad_ids_leave'" ;;
    *) return 1 ;;
  esac
}
ALL="short_golden_variants short_golden_matrix short_props_adam short_determinism short_simplex short_long_runs tb_last adam adam_2p31 group_pi triton_backend graphs graphs_cached dropin_determinism api_a api_b golden_variants golden_matrix golden_rest props_adam props_pi props_wloss props_rgd badref_opt badref_da badtriton losses group_pi_rest triton_backend_rest api_b_rest tb_golden_rest tb_follow_lowprec tb_dropins_resume_badids api_resume_rest api_misc determinism"
if [ "${1:-list}" = list ]; then for c in $ALL; do printf '%-20s %s\n' "$c" "$(args_of "$c")"; done; exit 0; fi
for c in "$@"; do args_of "$c" >/dev/null || { echo "unknown chunk: $c (try: list)"; exit 2; }; done

mkdir -p "$OUT"
if [ -n "${NO_INSTALL:-}" ]; then :
elif ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  echo "editable install failed (see install.log); importing from the checkout instead"
  ln -sfn ../kernels also_fused/kernels
  export PYTHONPATH=$PWD
fi
# hypothesis (test_properties.py) may be missing there: wheels carried in .whl/ are installed aside
if ! python3 -c "import hypothesis" 2>/dev/null && ls .whl/hypothesis-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
{
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import hypothesis; print('hypothesis', hypothesis.__version__)" 2>&1 | tail -n 1
  "$CS" --version | tail -n 2
  date -u +%Y-%m-%d
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run_chunk() {
  local c=$1 log="$OUT/$1.log" x=-x t0 rc
  [ "$c" = graphs ] || [ "$c" = graphs_cached ] && x=
  local cmd="python3 -m pytest -q -p no:cacheprovider $x --durations=0 --durations-min=1 $(args_of "$c")"
  # PYTORCH_NO_CUDA_MEMORY_CACHING=1 puts every tensor in its own cudaMalloc so that memcheck sees
  # out-of-bounds accesses; graphs_cached keeps the caching allocator (CUDA graph capture needs it)
  local nocache=1; [ "$c" = graphs_cached ] && nocache=
  echo "# chunk $c: PYTORCH_NO_CUDA_MEMORY_CACHING=${nocache:-unset} timeout -s INT $CHUNK_TIMEOUT compute-sanitizer --tool memcheck --error-exitcode 99 $cmd" > "$log"
  t0=$(date +%s)
  case "$c" in short_*) export ALSO_FUSED_SHORT_TESTS=1 ;; *) unset ALSO_FUSED_SHORT_TESTS ;; esac
  if [ -n "$nocache" ]; then export PYTORCH_NO_CUDA_MEMORY_CACHING=1; else unset PYTORCH_NO_CUDA_MEMORY_CACHING; fi
  # at the limit the process group gets SIGINT (pytest then prints how far it got; the sanitizer exits
  # without an ERROR SUMMARY, though it prints each error report as it happens)
  eval timeout -s INT -k 30 "$CHUNK_TIMEOUT" "$CS" --tool memcheck --error-exitcode 99 "$cmd" >> "$log" 2>&1
  rc=$?
  echo "rc=$rc wall=$(( $(date +%s) - t0 ))s" >> "$log"
  echo "$c: $(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' "$log" | tail -n 1) | $(grep 'ERROR SUMMARY' "$log" | tail -n 1) | $(tail -n 1 "$log")"
  return $rc
}

status=0
if [ $par = 1 ]; then
  for c in "$@"; do run_chunk "$c" & done
  wait
else
  for c in "$@"; do run_chunk "$c" || status=1; done
fi
exit $status
