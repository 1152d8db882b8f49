#!/usr/bin/env bash
# Builds the libFuzzer targets of testing/fuzz (tools/bazel build --config=fuzz) and runs each for
# SECONDS (default 60) from a copy of its seed corpus. Exits non-zero on any finding (a crash, a
# sanitizer report, a leak, a timeout); the reproducer is left in the working folder and printed.
# Run longer: testing/fuzz/run.sh 3600. Add a reproducer to testing/fuzz/corpus/<target>/ once
# fixed: the corpus tests of `bazel test //...` then replay it forever.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
if ! command -v clang-14 >/dev/null || [ ! -f /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a ]; then
  echo "fuzz: installing clang-14 and libclang-rt-14-dev" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq >&2
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends clang-14 libclang-rt-14-dev >&2
fi
targets=(json_fuzzer safetensors_fuzzer config_fuzzer)
tools/bazel build --config=fuzz $(printf '//testing/fuzz:%s ' "${targets[@]}")
work=$(mktemp -d)
status=0
for t in "${targets[@]}"; do
  corpus="$work/$t"
  mkdir -p "$corpus"
  cp testing/fuzz/corpus/"${t%_fuzzer}"/* "$corpus"/
  echo "fuzz: $t for ${seconds}s"
  if ! (cd "$work" && "$OLDPWD/bazel-bin/testing/fuzz/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
        -max_len=65536 -print_final_stats=1 "$corpus" >"$work/$t.log" 2>&1); then
    echo "fuzz: $t FOUND A FAILURE:"; tail -40 "$work/$t.log"; ls "$work"/crash-* "$work"/leak-* "$work"/timeout-* 2>/dev/null
    status=1
  else
    grep -E "stat::number_of_executed_runs|stat::new_units_added" "$work/$t.log" | tr '\n' ' '; echo
  fi
done
exit $status
