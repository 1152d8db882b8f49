"""Finds the CUDA toolkit: $CUDA_PATH, else /usr/local/cuda. Creates @local_cuda with nvcc, the
headers and the static CUDA runtime."""

def _cuda_configure_impl(rctx):
    path = rctx.os.environ.get("CUDA_PATH", "/usr/local/cuda")
    if not rctx.path(path + "/bin/nvcc").exists:
        fail("CUDA toolkit not found: no nvcc at {}/bin/nvcc (set CUDA_PATH)".format(path))
    for entry in ["bin", "include", "lib64", "nvvm"]:
        rctx.symlink(path + "/" + entry, entry)
    rctx.file("BUILD.bazel", """
package(default_visibility = ["//visibility:public"])

filegroup(name = "nvcc", srcs = ["bin/nvcc"])

# Everything nvcc reads besides the sources: its tools, headers (CUB/CCCL included) and nvvm.
filegroup(
    name = "headers_files",
    srcs = glob(["bin/**", "nvvm/**", "include/**"]),
)

cc_library(
    name = "cuda_headers",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp"]),
    includes = ["include"],
)

cc_library(
    name = "cudart_static",
    srcs = ["lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lrt", "-lpthread"],
    deps = [":cuda_headers"],
)
""")

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["CUDA_PATH"],
    local = True,
)
