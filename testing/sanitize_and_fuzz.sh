#!/usr/bin/env bash
# The checks for inputs from strangers, after `tools/bazel test //...`:
#  1. the io, layer, tool, parallel and fuzz-corpus tests again under AddressSanitizer + UBSan
#     (host code; the CUDA objects are compiled by nvcc and stay uninstrumented), and the rank
#     groups (ranks as threads) under ThreadSanitizer;
#  2. every fuzz target for FUZZ_SECONDS (default 30) each (testing/fuzz/run.sh); longer runs
#     happen outside CI (testing/fuzz/run.sh 3600).
# Exits non-zero on any failure or finding.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bazel test --config=asan --config=ubsan //moe/io:all //testing/layer:all //testing/fuzz:all \
  //testing/cpu:bad_input_test //testing/parallel:all
tools/bazel test --config=tsan //testing/parallel:communicator_test //testing/parallel:eplb_test
testing/fuzz/run.sh "${FUZZ_SECONDS:-30}"
