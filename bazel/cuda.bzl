"""CUDA from Bazel 4.2.3 without rules_cuda (not available offline).

Names follow rules_cuda so a later switch is a rename:
  cuda_library   compiles .cu files with nvcc, using the include paths and defines of its cc
                 deps, and returns CcInfo so cc_* targets depend on it (always linked in, so
                 static registrations such as gtest TESTs survive).
  cuda_test      cuda_library + cc_test, linked with the static CUDA runtime.
  cuda_binary    cuda_library + cc_binary, likewise.
  cuda_archs     the target architectures, a command-line flag:
                 --//bazel:cuda_archs=sm_90a,sm_80 (default). sm_90a is Hopper with wgmma. A
                 target may name its own (`archs`, replacing the flag's) or narrow the flag's to
                 the ones its sources are written for (`only_archs`).
Compilation follows the C++ rules: --compilation_mode opt gives -O3 -DNDEBUG, fastbuild -O1, dbg
-O0 -g for host code (device code stays optimised: -G would serialise the Hopper mainloops); and
the target-ISA flags of --copt/--cxxopt (-march=..., -m...) reach nvcc's host compiler, so a
header compiled both by g++ and by nvcc (Eigen's, in the layer's CUDA registry) is built for one
ISA and the one-definition rule holds. Other --copt flags (sanitizers, clang-only flags of the
fuzz configuration) stay with the C++ rules.
The toolkit comes from the repository rule in cuda_configure.bzl (CUDA_PATH, else /usr/local/cuda).
"""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")

CudaArchsInfo = provider(fields = ["archs"])

def _cuda_archs_impl(ctx):
    return CudaArchsInfo(archs = [a.strip() for a in ctx.build_setting_value.split(",") if a.strip()])

cuda_archs_flag = rule(
    implementation = _cuda_archs_impl,
    build_setting = config.string(flag = True),
)

def _gencode(arch):
    # sm_90a -> compute_90a/sm_90a; sm_80 -> compute_80/sm_80: machine code for each named arch.
    num = arch[len("sm_"):]
    return "-gencode=arch=compute_{n},code=sm_{n}".format(n = num)

def _cuda_library_impl(ctx):
    cc_toolchain = find_cpp_toolchain(ctx)
    feature_configuration = cc_common.configure_features(
        ctx = ctx,
        cc_toolchain = cc_toolchain,
        requested_features = ctx.features,
        unsupported_features = ctx.disabled_features,
    )
    nvcc = ctx.file._nvcc
    archs = ctx.attr.archs if ctx.attr.archs else ctx.attr._archs[CudaArchsInfo].archs
    if ctx.attr.only_archs:
        # Architecture-specific sources (sm_90a wgmma) compile only for their archs when the
        # build targets them; otherwise for the build's archs (their kernels then cannot run, and
        # the host code reports that).
        kept = [a for a in archs if a in ctx.attr.only_archs]
        archs = kept if kept else archs
    dep_contexts = [d[CcInfo].compilation_context for d in ctx.attr.deps if CcInfo in d]
    headers = depset(ctx.files.hdrs, transitive = [c.headers for c in dep_contexts])
    mode = ctx.var["COMPILATION_MODE"]
    optimisation = {"opt": ["-O3", "-DNDEBUG"], "fastbuild": ["-O1"], "dbg": ["-O0", "-g"]}[mode]
    args_common = ["-std=c++20"] + optimisation + ["-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo"]
    for flag in ctx.fragments.cpp.copts + ctx.fragments.cpp.cxxopts:
        if flag.startswith("-m"):
            args_common += ["-Xcompiler", flag]
    args_common += [_gencode(a) for a in archs]
    args_common += ["-I."]
    for c in dep_contexts:
        for inc in c.includes.to_list() + c.quote_includes.to_list():
            args_common += ["-I" + inc]
        for inc in c.system_includes.to_list():
            args_common += ["-isystem", inc]
        for d in c.defines.to_list():
            args_common += ["-D" + d]
    args_common += ["-I" + ctx.genfiles_dir.path, "-I" + ctx.bin_dir.path]
    args_common += ctx.attr.copts

    objects = []
    for src in ctx.files.srcs:
        obj = ctx.actions.declare_file("_objs/{}/{}.o".format(ctx.label.name, src.basename))
        ctx.actions.run(
            executable = nvcc,
            # -objtemp: nvcc's temporaries go beside the object, not into /tmp, where two
            # sandboxed compiles (both PID 2 in their namespaces) once picked the same names and
            # one deleted the other's .ptx.
            arguments = args_common + ["-objtemp", "-c", src.path, "-o", obj.path],
            inputs = depset([src] + ctx.files.hdrs + ctx.files._cuda_headers, transitive = [headers]),
            outputs = [obj],
            mnemonic = "NvccCompile",
            progress_message = "nvcc {}".format(src.short_path),
            env = {"PATH": "/usr/bin:/bin"},
        )
        objects.append(obj)

    archive = ctx.actions.declare_file("lib{}.a".format(ctx.label.name))
    ctx.actions.run(
        executable = cc_toolchain.ar_executable,
        arguments = ["rcs", archive.path] + [o.path for o in objects],
        inputs = depset(objects, transitive = [cc_toolchain.all_files]),
        outputs = [archive],
        mnemonic = "CudaArchive",
    )
    library = cc_common.create_library_to_link(
        actions = ctx.actions,
        feature_configuration = feature_configuration,
        cc_toolchain = cc_toolchain,
        static_library = archive,
        alwayslink = True,
    )
    linking_context = cc_common.create_linking_context(
        linker_inputs = depset([cc_common.create_linker_input(
            owner = ctx.label,
            libraries = depset([library]),
        )]),
    )
    compilation_context = cc_common.create_compilation_context(headers = depset(ctx.files.hdrs))
    own = CcInfo(compilation_context = compilation_context, linking_context = linking_context)
    return [
        DefaultInfo(files = depset([archive])),
        cc_common.merge_cc_infos(direct_cc_infos = [own], cc_infos = [d[CcInfo] for d in ctx.attr.deps if CcInfo in d]),
    ]

_cuda_library = rule(
    implementation = _cuda_library_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"]),
        "hdrs": attr.label_list(allow_files = [".h", ".cuh"]),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
        "archs": attr.string_list(),
        "only_archs": attr.string_list(),
        "_nvcc": attr.label(default = "@local_cuda//:nvcc", allow_single_file = True),
        "_cuda_headers": attr.label(default = "@local_cuda//:headers_files"),
        "_archs": attr.label(default = "//bazel:cuda_archs"),
        "_cc_toolchain": attr.label(default = "@bazel_tools//tools/cpp:current_cc_toolchain"),
    },
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    fragments = ["cpp"],
)

def cuda_library(name, srcs = [], hdrs = [], deps = [], copts = [], **kwargs):
    _cuda_library(name = name, srcs = srcs, hdrs = hdrs, deps = deps + ["@local_cuda//:cudart_static"], copts = copts, **kwargs)

def cuda_test(name, srcs, hdrs = [], deps = [], copts = [], tags = [], archs = [], **kwargs):
    cuda_library(name = name + "_cu", srcs = srcs, hdrs = hdrs, deps = deps, copts = copts, archs = archs, testonly = True)
    # Linked statically so the binary can be copied to a GPU machine on its own.
    native.cc_test(name = name, deps = [":" + name + "_cu"] + deps, tags = tags + ["cuda", "gpu"], linkstatic = True, **kwargs)

def cuda_binary(name, srcs, deps = [], copts = [], tags = [], archs = [], **kwargs):
    cuda_library(name = name + "_cu", srcs = srcs, deps = deps, copts = copts, archs = archs)
    native.cc_binary(name = name, deps = [":" + name + "_cu"] + deps, tags = tags + ["cuda", "gpu"], linkstatic = True, **kwargs)
