"""Finds CUTLASS's C++ headers in the `nvidia-cutlass` Python wheel (PyPI is the one source of
CUTLASS reachable offline here; tools/bazel installs the pinned version). Creates @cutlass with a
header-only cc_library. $CUTLASS_INCLUDE overrides the location (a CUTLASS checkout's include/)."""

def _cutlass_configure_impl(rctx):
    include = rctx.os.environ.get("CUTLASS_INCLUDE", "")
    if not include:
        python = rctx.which("python3")
        if python == None:
            fail("CUTLASS: python3 not found; install nvidia-cutlass (tools/bazel does) or set CUTLASS_INCLUDE")
        result = rctx.execute([python, "-c", "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"])
        if result.return_code != 0:
            fail("CUTLASS: the nvidia-cutlass wheel is not installed (pip install nvidia-cutlass==4.2.0.0, as tools/bazel does), or set CUTLASS_INCLUDE:\n" + result.stderr)
        include = result.stdout.strip()
    if not rctx.path(include + "/cutlass/cutlass.h").exists:
        fail("CUTLASS: no cutlass/cutlass.h under " + include)
    rctx.symlink(include, "include")
    rctx.file("BUILD.bazel", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "cutlass",
    hdrs = glob(["include/cutlass/**", "include/cute/**"]),
    includes = ["include"],
)
""")

cutlass_configure = repository_rule(
    implementation = _cutlass_configure_impl,
    environ = ["CUTLASS_INCLUDE", "PATH"],
    local = True,
)
