#!/usr/bin/env bash
# Runs on the GPU machine, inside the bundle made by run_on_device.sh: every CUDA test, the
# end-to-end tests under compute-sanitizer (memcheck, racecheck) at small sizes, and the
# benchmarks. Logs go to OUT_DIR (default: ./logs). Prints a summary last.
#   ./run_all.sh [OUT_DIR] [PARTS]
# PARTS (default "tests memcheck racecheck bench"): the parts to run, so that the whole can be split
# over device calls of at most 600 s each (all four together ran past that on 2026-12-03).
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-logs}
parts=" ${2:-tests memcheck racecheck bench} "
wants() { [[ "$parts" == *" $1 "* ]]; }
mkdir -p "$out"
export LD_LIBRARY_PATH=.:${LD_LIBRARY_PATH:-}  # libcublas.so.13 (benchmark ceiling) comes from the CUDA image
# NCCL (nccl_communicator_test) is loaded at run time: from the CUDA image, else PyTorch's
# nvidia-nccl wheel. NVLink multicast stays off (the device tool's rule).
export NCCL_NVLS_ENABLE=0
if [ -z "${MOE_NCCL_LIBRARY:-}" ] && ! ls /usr/local/cuda/lib*/libnccl.so.2 >/dev/null 2>&1; then
  MOE_NCCL_LIBRARY=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null) &&
    export MOE_NCCL_LIBRARY
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
summary=()
for t in *_test; do
  wants tests || break
  ./"$t" --gtest_brief=1 >"$out/$t.log" 2>&1
  rc=$?
  summary+=("$t: rc=$rc $(grep -E '^\[  (PASSED|FAILED) ' "$out/$t.log" | tr '\n' ' ')")
done
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Small sizes under the sanitizers: a filter per test binary.
filter_for() {
  case "$1" in
    differential_test) echo '*Differential.Sm90*:*Differential.Bf16*:*Differential.Swiglu*:*Differential.Batched*:*Differential.ExpertParallel*:*Differential.CheckedMode*:*Differential.UserRouting*:*Differential.UserOutputEpilogue*:*Differential.UserIntermediateEpilogue*' ;;
    layer_backends_test) echo '*' ;;
    device_layer_test) echo '*' ;;  # every architecture: Llama-4's top_k = 1 found a finalize overread
    *) echo '*' ;;
  esac
}
for tool in memcheck racecheck; do
  wants "$tool" || continue
  for t in *_test; do
    # cuda_check_test fails a CUDA call on purpose, which the sanitizers report: not run under them.
    [ "$t" = cuda_check_test ] && continue
    "$sanitizer" --tool "$tool" --error-exitcode 99 ./"$t" --gtest_filter="$(filter_for "$t")" \
      >"$out/$t.$tool.log" 2>&1
    rc=$?
    summary+=("$t under $tool: rc=$rc $(grep -E '(ERROR|RACECHECK) SUMMARY' "$out/$t.$tool.log" | tail -1)")
  done
done
if wants bench && [ -x ./demo ]; then  # the main job; picks the CUDA backend on a GPU
  ./demo >"$out/demo.log" 2>&1
  summary+=("demo: rc=$? $(grep -E 'backend:' "$out/demo.log" | head -1)")
fi
for b in *_benchmark; do
  wants bench && [ -x "$b" ] || continue
  if [ "$b" = ep_all_to_all_benchmark ]; then  # CSV, one rank per visible GPU
    ./"$b" >"$out/$b.csv" 2>"$out/$b.log"
  else
    ./"$b" --benchmark_format=json >"$out/$b.json" 2>"$out/$b.log"
  fi
  summary+=("$b: rc=$?")
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
