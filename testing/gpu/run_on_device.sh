#!/usr/bin/env bash
# Builds every CUDA test and benchmark here and copies the binaries into gpu_bundle/ (git-ignored),
# with libbenchmark.so.1debian beside them and run_all.sh, and packs the folder into
# gpu_bundle.txz (git-ignored). The fat binaries outgrew the device tool's 64 MiB carry long ago;
# gzip brought them to 56.7 MB at 4eef695, xz to 39.2 MB (25 s on two cores), which leaves room
# for the next tests. Carry gpu_bundle.txz to the GPU machine; there, one command runs everything
# (python's tarfile reads xz where the image has no xz binary):
#   { tar xJf gpu_bundle.txz || python3 -m tarfile -e gpu_bundle.txz .; } && cd gpu_bundle && ./run_all.sh [OUT_DIR]
# or a part per call where the whole would pass the device's 600 s: ./run_all.sh OUT tests, then memcheck, ...
set -euo pipefail
cd "$(dirname "$0")/../.."
# The device tool carries at most 64 MiB: the fat binaries (sm_90a + sm_80) of the tests and the
# benchmark fit; the demo and the moe tool go in a second folder (MOE_GPU_TOOLS=1 adds them here).
targets="$(tools/bazel query 'attr(tags, "gpu", kind("cc_test|cc_binary", //...))' 2>/dev/null)"
if [ "${MOE_GPU_TOOLS:-0}" = 1 ]; then targets="$targets //cli:demo //cli:moe"; fi
tools/bazel build $targets
rm -rf gpu_bundle && mkdir -p gpu_bundle
for t in $targets; do
  path=bazel-bin/$(echo "${t#//}" | tr ':' '/')
  cp -L "$path" gpu_bundle/
done
cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian gpu_bundle/
cp -L "$(g++ -print-file-name=libgomp.so.1)" gpu_bundle/  # OpenMP runtime of the CPU reference
cp testing/gpu/run_all.sh gpu_bundle/
tar cf - gpu_bundle | xz -T2 -6 > gpu_bundle.txz
ls -la gpu_bundle gpu_bundle.txz
