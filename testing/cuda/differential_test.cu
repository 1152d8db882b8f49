// CPU reference vs CUDA backend, end to end, for every policy family, on the same random inputs.
//
// Tolerances (relative to the largest |CPU| output), and why:
//   bf16 2e-2, f16 4e-3: both backends round at the same points; GEMM accumulation order differs
//     (tensor-core fp32 vs Eigen fp32), which can move a value across a rounding boundary of the
//     intermediate or the output by one ulp (2^-8, 2^-11).
//   f32 5e-3: the CUDA path multiplies in tf32 (10-bit mantissa), ~2^-11 relative per product.
// Index outputs are compared exactly by the CPU/CUDA op tests; here the end-to-end output checks
// that routing (ids and order) agreed, since any flipped expert changes the output by O(1).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "moe/cuda/kernel.cuh"
#include "testing/lib/gpu.h"
#include "testing/lib/harness.h"

namespace {

using moe::Index;
using moe::testing::Case;
using moe::testing::DeviceBuffer;
using moe::testing::Harness;

template <class T>
moe::testing::Tolerance gpu_tolerance() {
  if constexpr (std::is_same_v<T, float>) return {1e-4, 5e-3};
  else return moe::testing::tolerance<T>();
}

// Device copies of a harness's inputs and the CUDA Arguments over them.
template <class Spec>
struct DeviceInputs {
  using IO = typename Spec::ElementIO;
  using W = typename Spec::ElementWeight;
  using Args = moe::Arguments<Spec, moe::DeviceSpace>;
  Harness<Spec>& h;
  DeviceBuffer<IO> hidden, b13, b2, output;
  DeviceBuffer<float> logits, bias, weights;
  DeviceBuffer<std::int32_t> ids, map;
  DeviceBuffer<W> w13, w2;
  std::vector<DeviceBuffer<float>> channel_vectors;  // the output epilogue's leaves
  std::vector<DeviceBuffer<IO>> token_tensors;
  std::vector<DeviceBuffer<float>> activation_channels;  // an intermediate epilogue's channel vectors

  explicit DeviceInputs(Harness<Spec>& harness)
      : h(harness), hidden(h.hidden), b13(h.b13), b2(h.b2), output(h.output.size()), logits(h.logits),
        bias(h.correction_bias), weights(h.weights), ids(h.ids), map(h.map), w13(h.w13), w2(h.w2) {
    for (const auto& v : h.channel_vectors) channel_vectors.emplace_back(v);
    for (const auto& t : h.token_tensors) token_tensors.emplace_back(t);
    if constexpr (moe::kIsActivationThen<typename Spec::Activation>) {
      const auto& e = h.activation_args.epilogue;
      for (int i = 0; i < moe::kMaxEpilogueLeaves && e.channel_vectors[i] != nullptr; ++i) {
        activation_channels.emplace_back(
            std::vector<float>(e.channel_vectors[i], e.channel_vectors[i] + e.channel_vector_lengths[i]));
      }
    }
  }

  Args args() const {
    const auto host = h.arguments();  // same optional fields, same shapes
    Args a;
    const auto& c = h.c;
    a.hidden_states = moe::DeviceView<const IO, 2>(hidden.data(), {c.M, c.H});
    a.router_logits = moe::DeviceView<const float, 2>(logits.data(), {c.M, c.E});
    if (host.correction_bias) a.correction_bias = moe::DeviceView<const float, 1>(bias.data(), {c.E});
    if (host.topk_ids) a.topk_ids = moe::DeviceView<const std::int32_t, 2>(ids.data(), {c.M, c.top_k});
    if (host.topk_weights) a.topk_weights = moe::DeviceView<const float, 2>(weights.data(), {c.M, c.top_k});
    a.top_k = c.top_k;
    a.w13 = moe::DeviceView<const W, 3>(w13.data(), host.w13.extents());
    a.w2 = moe::DeviceView<const W, 3>(w2.data(), host.w2.extents());
    if (host.w13_bias) a.w13_bias = moe::DeviceView<const IO, 2>(b13.data(), host.w13_bias->extents());
    if (host.w2_bias) a.w2_bias = moe::DeviceView<const IO, 2>(b2.data(), host.w2_bias->extents());
    if (host.expert_map) a.expert_map = moe::DeviceView<const std::int32_t, 1>(map.data(), {c.E});
    a.routing = host.routing;
    a.activation = host.activation;
    if constexpr (moe::kIsActivationThen<typename Spec::Activation>) {
      for (std::size_t i = 0; i < activation_channels.size(); ++i) {
        a.activation.epilogue.channel_vectors[i] = activation_channels[i].data();
      }
    }
    a.prepare_finalize = host.prepare_finalize;
    a.epilogue.scalars = host.epilogue.scalars;
    for (std::size_t i = 0; i < channel_vectors.size(); ++i) {
      a.epilogue.channel_vectors[i] = moe::DeviceView<const float, 1>(channel_vectors[i].data(), {c.H});
    }
    for (std::size_t i = 0; i < token_tensors.size(); ++i) {
      a.epilogue.token_tensors[i] = moe::DeviceView<const IO, 2>(token_tensors[i].data(), {c.M, c.H});
    }
    a.output = moe::DeviceView<IO, 2>(output.data(), {c.M, c.H});
    return a;
  }
};

template <class IO>
std::vector<float> to_floats(const std::vector<IO>& v) {
  std::vector<float> f(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) f[i] = moe::to_float(v[i]);
  return f;
}

// Captures `run()` (a forward on `stream`) into a CUDA graph and replays it once, synchronized.
template <class Run>
void replay_from_graph(cudaStream_t stream, Run run) {
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  const moe::Status captured = run();
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_TRUE(captured.is_ok()) << captured.to_string();
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// Runs the CPU and CUDA backends on `c`, compares, then checks bitwise reproducibility under
// poisoned workspaces and under CUDA-graph capture.
template <class Spec, class Arch = moe::cuda::Sm90, class Setup = void (*)(Harness<Spec>&)>
void check_case(Case c, Setup setup = [](Harness<Spec>&) {}, std::optional<moe::cuda::gemm::Sm90Tile> tile = {}) {
  using IO = typename Spec::ElementIO;
  Harness<Spec> h(c);
  setup(h);
  const moe::Status cpu = h.run();
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();
  const std::vector<IO> reference = h.output;

  DeviceInputs<Spec> d(h);
  moe::cuda::Options options;
  options.chunk_tokens = c.chunk_tokens;
  options.sm90_tile = tile;
  moe::Kernel<Spec, Arch> kernel(options);
  const auto args = d.args();
  DeviceBuffer<std::byte> ws(kernel.workspace_bytes(args));
  std::vector<IO> first;
  for (unsigned char poison : {0xD5, 0x2A}) {
    ws.fill_bytes(poison);
    d.output.fill_bytes(0xFF);  // NaN in every float type: unwritten elements fail the comparison
    const moe::Status s = kernel.run(args, std::span<std::byte>(ws.data(), ws.size()));
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<IO> out = d.output.download();
    if (first.empty()) {
      first = out;
      EXPECT_TRUE(moe::testing::all_close(to_floats(out), to_floats(reference), gpu_tolerance<IO>()))
          << "M=" << c.M << " E=" << c.E << " k=" << c.top_k;
    } else {
      EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(IO))) << "differs with workspace poison " << int(poison);
    }
  }
  // The whole forward captured in a CUDA graph gives the same bits.
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  d.output.fill_bytes(0xFF);
  ASSERT_NO_FATAL_FAILURE(replay_from_graph(stream, [&] { return kernel.run(args, std::span<std::byte>(ws.data(), ws.size()), stream); }));
  const std::vector<IO> graphed = d.output.download();
  EXPECT_EQ(0, std::memcmp(first.data(), graphed.data(), graphed.size() * sizeof(IO))) << "graph replay differs";
  // Programmatic dependent launch only moves when kernels start: every mode, same bits.
  for (const auto mode : {moe::cuda::ProgrammaticLaunch::kOff, moe::cuda::ProgrammaticLaunch::kFusedSwapOnly,
                          moe::cuda::ProgrammaticLaunch::kEverySchedule}) {
    moe::cuda::Options launch_mode = options;
    launch_mode.programmatic_launch = mode;
    d.output.fill_bytes(0xFF);
    const moe::Status run = moe::Kernel<Spec, Arch>(launch_mode).run(args, std::span<std::byte>(ws.data(), ws.size()), stream);
    ASSERT_TRUE(run.is_ok()) << run.to_string();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::vector<IO> out = d.output.download();
    EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(IO)))
        << "differs with programmatic launch mode " << static_cast<int>(mode);
  }
  cudaStreamDestroy(stream);
}

template <class A, class Q = moe::quant::BF16, class R = moe::routing::Precomputed,
          class PF = moe::StandardPrepareFinalize<>>
using SpecOf = moe::Spec<R, PF, moe::Experts<A, Q>>;

Case sized(Index M, Index E = 8, int k = 2, Index H = 72, Index I = 40) {
  Case c;
  c.M = M;
  c.E = E;
  c.top_k = k;
  c.H = H;
  c.I = I;
  c.seed = static_cast<std::uint64_t>(M * 131 + E);
  return c;
}

// The batch sizes every policy family is checked at (65536 and 2^31+ addressing have own tests).
constexpr Index kBatchSizes[] = {0, 1, 7, 64, 1000};

class Differential : public ::testing::Test {
 protected:
  void SetUp() override { MOE_SKIP_WITHOUT_GPU(); }
};

TEST_F(Differential, Bf16SiluSoftmaxAcrossBatchSizes) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::SoftmaxTopK>;
  for (Index M : kBatchSizes) {
    check_case<S>(sized(M, 16, 4), [](Harness<S>& h) { h.routing_args.renormalize = true; });
  }
}

TEST_F(Differential, F16GeluWithBiases) {
  for (Index M : kBatchSizes) {
    Case c = sized(M);
    c.bias = true;
    check_case<SpecOf<moe::GeluAndMul, moe::quant::F16>>(c);
  }
}

TEST_F(Differential, F32ThroughTf32) {
  for (Index M : kBatchSizes) check_case<SpecOf<moe::SiluAndMul, moe::quant::F32>>(sized(M));
}

TEST_F(Differential, SwigluOaiInterleavedWithBiases) {
  for (Index M : kBatchSizes) {
    Case c = sized(M, 32, 4, 96, 64);
    c.bias = true;
    check_case<SpecOf<moe::SwigluOai>>(c);
  }
}

TEST_F(Differential, UngatedRelu2AndGeluTanh) {
  for (Index M : kBatchSizes) {
    check_case<SpecOf<moe::Relu2>>(sized(M));
    check_case<SpecOf<moe::GeluTanhAndMul>>(sized(M));
    check_case<SpecOf<moe::Silu, moe::quant::F16>>(sized(M));
  }
}

TEST_F(Differential, GroupedSigmoidWithCorrectionBias) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::GroupedTopK<moe::routing::Sigmoid>>;
  for (Index M : kBatchSizes) {
    Case c = sized(M, 64, 8);
    c.with_correction_bias = true;
    check_case<S>(c, [](Harness<S>& h) { h.routing_args = {8, 4, true, 2.5f}; });
  }
}

TEST_F(Differential, Llama4WeightOnInput) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::Llama4TopK, moe::StandardPrepareFinalize<true>>;
  for (Index M : kBatchSizes) check_case<S>(sized(M, 16, 1));
}

TEST_F(Differential, BatchedFormat) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::Precomputed, moe::BatchedPrepareFinalize<>>;
  for (Index M : kBatchSizes) check_case<S>(sized(M, 8, 2));
}

// Batched format with slots beyond an expert's capacity: the CPU refuses the forward; the GPU
// drops them and counts them on the device (per chunk, summed over chunks), read back without a
// synchronization inside the forward, the same count from a CUDA graph; every token whose slots
// all fit gets the CPU's output for it (the CPU run on the fitting slots only).
TEST_F(Differential, BatchedOverflowIsCountedOnTheDevice) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::Precomputed, moe::BatchedPrepareFinalize<>>;
  const Index M = 100, capacity = 20;
  for (const Index chunk : {Index{100}, Index{30}}) {
    Case c = sized(M, 8, 2);
    c.chunk_tokens = chunk;
    for (Index m = 0; m < M; ++m) {  // expert 3 overflows in every chunk, the others fit
      const std::int32_t first = m % 3 == 0 ? 3 : (m % 8 == 5 ? 6 : static_cast<std::int32_t>(m % 8));
      c.ids.insert(c.ids.end(), {first, 5});
    }
    // Expected drops: per chunk and expert, the slots past `capacity` in slot order.
    std::int64_t expected = 0;
    std::vector<bool> fits(static_cast<std::size_t>(M), true);
    for (Index m0 = 0; m0 < M; m0 += chunk) {
      std::vector<Index> seen(8, 0);
      for (Index m = m0; m < std::min(M, m0 + chunk); ++m) {
        for (int j = 0; j < 2; ++j) {
          if (++seen[static_cast<std::size_t>(c.ids[m * 2 + j])] > capacity) {
            ++expected;
            fits[static_cast<std::size_t>(m)] = false;
          }
        }
      }
    }
    ASSERT_GT(expected, 0);
    moe::testing::Harness<S> h(c);
    h.pf_args.max_tokens_per_expert = capacity;
    const moe::Status cpu = h.run();
    EXPECT_FALSE(cpu.is_ok());
    EXPECT_NE(cpu.to_string().find("max_tokens_per_expert"), std::string::npos) << cpu.to_string();

    DeviceInputs<S> d(h);
    DeviceBuffer<std::int64_t> dropped(1);
    auto args = d.args();
    args.prepare_finalize.dropped_slots = dropped.data();
    moe::cuda::Options options;
    options.chunk_tokens = chunk;
    moe::Kernel<S, moe::cuda::Sm90> kernel(options);
    DeviceBuffer<std::byte> ws(kernel.workspace_bytes(args));
    dropped.fill_bytes(0x7F);
    ASSERT_TRUE(kernel.run(args, std::span<std::byte>(ws.data(), ws.size())).is_ok());
    EXPECT_EQ(dropped.download()[0], expected) << "chunk " << chunk;
    const std::vector<moe::bfloat16> gpu = d.output.download();
    // The same count from a graph replay.
    cudaStream_t stream;
    ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
    dropped.fill_bytes(0x7F);
    ASSERT_NO_FATAL_FAILURE(replay_from_graph(stream, [&] { return kernel.run(args, std::span<std::byte>(ws.data(), ws.size()), stream); }));
    EXPECT_EQ(dropped.download()[0], expected);
    cudaStreamDestroy(stream);
    // Tokens whose slots all fit: the CPU's output with the capacity large enough.
    h.pf_args.max_tokens_per_expert = M * 2;
    ASSERT_TRUE(h.run().is_ok());
    for (Index m = 0; m < M; ++m) {
      if (!fits[static_cast<std::size_t>(m)]) continue;
      std::vector<float> a, b;
      for (Index x = 0; x < c.H; ++x) {
        a.push_back(moe::to_float(gpu[m * c.H + x]));
        b.push_back(moe::to_float(h.output[m * c.H + x]));
      }
      EXPECT_TRUE(moe::testing::all_close(a, b, gpu_tolerance<moe::bfloat16>())) << "token " << m;
    }
  }
}

TEST_F(Differential, ExpertParallelRoundRobinRank) {
  for (Index M : kBatchSizes) {
    for (auto placement : {moe::ExpertPlacement::kLinear, moe::ExpertPlacement::kRoundRobin}) {
      Case c = sized(M, 13, 3);
      c.ep_size = 3;
      c.ep_rank = 1;
      c.placement = placement;
      check_case<SpecOf<moe::SiluAndMul>>(c);
    }
  }
}

TEST_F(Differential, ManyExpertsLargeTopK) {
  using S = SpecOf<moe::SiluAndMul, moe::quant::BF16, moe::routing::SoftmaxTopK>;
  for (Index M : {1, 64, 1000}) check_case<S>(sized(M, 512, 16, 64, 32));
}

TEST_F(Differential, AllTokensOnOneExpertAndEmptyExperts) {
  Case c = sized(1000, 8, 2);
  for (Index m = 0; m < c.M; ++m) c.ids.insert(c.ids.end(), {6, 1});
  check_case<SpecOf<moe::SiluAndMul>>(c);
}

// Widths that are not multiples of 8 take the generic mainloop (the pipelined one needs 16-byte rows).
TEST_F(Differential, WidthsNotMultiplesOfEight) {
  for (Index M : kBatchSizes) {
    Case c = sized(M, 8, 2, 70, 30);
    c.bias = true;
    check_case<SpecOf<moe::SiluAndMul>>(c);
    check_case<SpecOf<moe::SwigluOai, moe::quant::F16>>(c);
  }
}

// Every tile of the Hopper schedule (normal and swapped orientations) on bf16 and f16, at batch
// sizes that leave experts empty, thin (a few rows) and spanning several 128- and 256-row tiles.
TEST_F(Differential, Sm90EveryTile) {
  using moe::cuda::gemm::Sm90Tile;
  for (const Sm90Tile t : {Sm90Tile::kNormal128x256, Sm90Tile::kPingpong128x128, Sm90Tile::kPingpong64x256,
                           Sm90Tile::kSwap128x64,
                           Sm90Tile::kSwap128x32, Sm90Tile::kSwap128x16, Sm90Tile::kFusedSwap128x64,
                           Sm90Tile::kFusedSwap128x32, Sm90Tile::kFusedSwap128x16}) {
    for (Index M : kBatchSizes) {
      SCOPED_TRACE(moe::cuda::gemm::name(t));
      check_case<SpecOf<moe::SiluAndMul>>(sized(M, 8, 2, 136, 264), [](auto&) {}, t);
      check_case<SpecOf<moe::SwigluOai, moe::quant::F16>>(sized(M, 6, 3, 64, 48), [](auto&) {}, t);
      // Interleaved gate/up rows (the fused swap tiles pair them across lanes): several 64-output
      // tiles and a partial one (I = 264), K splits at the small batch sizes.
      check_case<SpecOf<moe::InterleavedGateUp<moe::SiluAndMul>>>(sized(M, 8, 2, 136, 264), [](auto&) {}, t);
    }
  }
}

// The portable schedule pinned on the Sm90 tag computes the same function as the Hopper one.
TEST_F(Differential, Sm80ScheduleOnHopper) {
  using Arch = moe::cuda::Sm90WithSchedule<moe::cuda::gemm::Sm80CpAsync>;
  for (Index M : kBatchSizes) {
    check_case<SpecOf<moe::SiluAndMul>, Arch>(sized(M, 8, 2, 136, 264));
    check_case<SpecOf<moe::Relu2, moe::quant::F16>, Arch>(sized(M));
  }
}

// A user output epilogue (moe/output_epilogue.h): out = clamp(residual + s0 * sum, s1, s2) * channel,
// through both finalize kernels (the Hopper schedule's stored-output finalize at large M, the
// weighted finalize after the fused swap schedule at small M and after the Sm80 schedule), with
// chunking (token indices of the leaves are global).
template <class Q>
using SpecWithOutputEpilogue = moe::Spec<
    moe::routing::Precomputed, moe::StandardPrepareFinalize<>, moe::Experts<moe::SiluAndMul, Q>,
    moe::epilogue::Times<
        moe::epilogue::Min<moe::epilogue::Max<moe::epilogue::Plus<moe::epilogue::TokenTensor<0>,
                                                                  moe::epilogue::Times<moe::epilogue::Scalar<0>,
                                                                                       moe::epilogue::Reduced>>,
                                              moe::epilogue::Scalar<1>>,
                           moe::epilogue::Scalar<2>>,
        moe::epilogue::ChannelVector<0>>>;

TEST_F(Differential, UserOutputEpilogue) {
  auto bounds = [](auto& h) { h.epilogue_scalars = {0.75f, -1.5f, 1.5f, 0.0f}; };
  using Bf16 = SpecWithOutputEpilogue<moe::quant::BF16>;
  for (Index M : kBatchSizes) {
    Case c = sized(M);
    c.chunk_tokens = 300;
    check_case<Bf16>(c, bounds);
  }
  check_case<Bf16, moe::cuda::Sm90WithSchedule<moe::cuda::gemm::Sm80CpAsync>>(sized(64), bounds);
  check_case<SpecWithOutputEpilogue<moe::quant::F32>>(sized(100), bounds);
}

// A user intermediate epilogue (moe/intermediate_epilogue.h): inter = clamp(act * channel[i], -s0,
// s0) fused into GEMM1's epilogue on every schedule: the fused swap mainloop (small M), its split-K
// reduction (M = 1: few tiles), the CUTLASS schedule's activation pass (large M), the Sm80 mainloops.
template <class A, class Q>
using SpecWithIntermediateEpilogue = moe::Spec<
    moe::routing::Precomputed, moe::StandardPrepareFinalize<>,
    moe::Experts<moe::ActivationThen<A, moe::epilogue::Min<moe::epilogue::Max<moe::epilogue::Times<moe::epilogue::Activated,
                                                                                                      moe::epilogue::ChannelVector<0>>,
                                                                                moe::epilogue::Scalar<1>>,
                                                            moe::epilogue::Scalar<0>>>,
                 Q>>;

TEST_F(Differential, UserIntermediateEpilogue) {
  static std::vector<float> channel;
  auto bind = [](auto& h) {
    channel.resize(static_cast<std::size_t>(h.c.I));
    for (std::size_t i = 0; i < channel.size(); ++i) channel[i] = 0.25f + 0.125f * static_cast<float>(i % 13);
    auto& e = h.activation_args.epilogue;
    e.scalars[0] = 0.05f;  // tight: a good share of the values is clamped on each side
    e.scalars[1] = -0.05f;
    e.channel_vectors[0] = channel.data();
    e.channel_vector_lengths[0] = h.c.I;
  };
  using Bf16 = SpecWithIntermediateEpilogue<moe::SiluAndMul, moe::quant::BF16>;
  for (Index M : kBatchSizes) check_case<Bf16>(sized(M), bind);
  check_case<Bf16, moe::cuda::Sm90WithSchedule<moe::cuda::gemm::Sm80CpAsync>>(sized(64), bind);
  Case biased = sized(64, 32, 4, 96, 64);
  biased.bias = true;
  check_case<SpecWithIntermediateEpilogue<moe::SwigluOai, moe::quant::BF16>>(biased, bind);
  check_case<SpecWithIntermediateEpilogue<moe::SiluAndMul, moe::quant::F32>>(sized(100), bind);
}

TEST_F(Differential, ChunkedForward) {
  Case c = sized(333, 8, 2);
  c.chunk_tokens = 100;
  check_case<SpecOf<moe::SiluAndMul>>(c);
}

// A user activation runs on the GPU with no new kernel code.
struct SquaredReluAndMul : moe::GatedActivation {
  static constexpr std::string_view kName = "squared_relu_and_mul";
  MOE_HOST_DEVICE static float apply(float gate, float up) {
    const float r = moe::math::fmax(gate, 0.0f);
    return r * r * up;
  }
};
static_assert(moe::ActivationPolicy<SquaredReluAndMul> && SquaredReluAndMul::kName == "squared_relu_and_mul");

// A user routing rule runs on the GPU through the generic path: the k smallest logits, equal weights.
struct ContrarianTopK : moe::routing::TopKBase {
  static constexpr std::string_view kName = "contrarian";
  struct Arguments {};
  MOE_HOST_DEVICE static void route_token(const moe::routing::TokenContext& t, const Arguments&) {
    for (int i = 0; i < t.num_experts; ++i) t.scratch[i] = -t.logits[i];
    moe::routing::select_topk(t.scratch, t.num_experts, t.top_k, t.ids, t.weights);
    for (int j = 0; j < t.top_k; ++j) t.weights[j] = 1.0f / static_cast<float>(t.top_k);
  }
};

TEST_F(Differential, UserRoutingPolicy) {
  for (Index M : kBatchSizes) check_case<SpecOf<moe::SiluAndMul, moe::quant::BF16, ContrarianTopK>>(sized(M, 12, 3));
}

TEST_F(Differential, UserActivation) {
  for (Index M : kBatchSizes) check_case<SpecOf<SquaredReluAndMul>>(sized(M));
}

TEST_F(Differential, CheckedModeReportsInvalidIds) {
  using S = SpecOf<moe::SiluAndMul>;
  Case c = sized(16);
  Harness<S> h(c);
  h.ids[3] = 99;
  DeviceInputs<S> d(h);
  moe::cuda::Options o;
  o.check_device_inputs = true;
  moe::Kernel<S, moe::cuda::Sm90> kernel(o);
  const auto args = d.args();
  DeviceBuffer<std::byte> ws(kernel.workspace_bytes(args));
  d.output.fill_bytes(0x77);
  const moe::Status s = kernel.run(args, std::span<std::byte>(ws.data(), ws.size()));
  EXPECT_EQ(s.code(), moe::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("topk_ids"), std::string::npos) << s.message();
  for (auto v : d.output.download()) ASSERT_EQ(v.bits, 0x7777);
  // Unchecked, the id contributes zero and never forms an address (compute-sanitizer run).
  moe::Kernel<S, moe::cuda::Sm90> unchecked;
  ASSERT_TRUE(unchecked.run(args, std::span<std::byte>(ws.data(), ws.size())).is_ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}


TEST_F(Differential, LargestBatchSize) {
  check_case<SpecOf<moe::SiluAndMul>>(sized(65536, 16, 4, 40, 24));
}

// M*top_k*H > 2^31 elements addressed in one chunk (the gathered rows and GEMM2's output): checks
// 64-bit offsets. Compares sampled tokens (including the last ones, whose rows sit at the far end)
// against the naive forward.
TEST_F(Differential, RowOffsetsBeyond32Bits) {
  using S = SpecOf<moe::SiluAndMul>;
  using Kernel = moe::Kernel<S, moe::cuda::Sm90>;
  const Index M = 131072, H = 8320, I = 16, E = 4;
  const int k = 2;
  ASSERT_GT(M * k * H, Index{1} << 31);
  std::vector<moe::bfloat16> hidden(M * H);
  std::uint64_t state = 12345;
  auto next = [&state] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>(state >> 40) * (2.0f / 16777216.0f) - 1.0f;
  };
  for (auto& x : hidden) x = moe::bfloat16(next());
  std::vector<moe::bfloat16> w13(E * 2 * I * H), w2(E * H * I);
  for (auto& x : w13) x = moe::bfloat16(next() * 0.02f);
  for (auto& x : w2) x = moe::bfloat16(next() * 0.25f);
  std::vector<std::int32_t> ids(M * k);
  std::vector<float> weights(M * k);
  for (Index m = 0; m < M; ++m) {
    ids[m * k] = static_cast<std::int32_t>(m % E);
    ids[m * k + 1] = static_cast<std::int32_t>((m + 1 + (m / E) % (E - 1)) % E);  // offset 1..E-1: distinct
    weights[m * k] = 0.75f;
    weights[m * k + 1] = 0.25f;
  }
  DeviceBuffer<moe::bfloat16> d_hidden(hidden), d_w13(w13), d_w2(w2), d_out(M * H);
  DeviceBuffer<std::int32_t> d_ids(ids);
  DeviceBuffer<float> d_weights(weights);
  Kernel::Arguments a;
  a.hidden_states = moe::DeviceView<const moe::bfloat16, 2>(d_hidden.data(), {M, H});
  a.topk_ids = moe::DeviceView<const std::int32_t, 2>(d_ids.data(), {M, k});
  a.topk_weights = moe::DeviceView<const float, 2>(d_weights.data(), {M, k});
  a.top_k = k;
  a.w13 = moe::DeviceView<const moe::bfloat16, 3>(d_w13.data(), {E, 2 * I, H});
  a.w2 = moe::DeviceView<const moe::bfloat16, 3>(d_w2.data(), {E, H, I});
  a.output = moe::DeviceView<moe::bfloat16, 2>(d_out.data(), {M, H});
  moe::cuda::Options o;
  o.chunk_tokens = M;  // one chunk: every row of the 2^31+ element buffers in one launch
  Kernel kernel(o);
  DeviceBuffer<std::byte> ws(kernel.workspace_bytes(a));
  d_out.fill_bytes(0xFF);
  const moe::Status s = kernel.run(a, std::span<std::byte>(ws.data(), ws.size()));
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<moe::bfloat16> out = d_out.download();

  moe::naive::Layer L;
  L.hidden = static_cast<int>(H);
  L.intermediate = static_cast<int>(I);
  L.num_local_experts = L.num_experts = static_cast<int>(E);
  L.gated_act = [](double g, double u) { return moe::naive::silu(g) * u; };
  for (auto x : w13) L.w13.push_back(moe::to_float(x));
  for (auto x : w2) L.w2.push_back(moe::to_float(x));
  std::vector<Index> sample;
  for (Index m = 0; m < 64; ++m) sample.push_back(m);
  for (Index m = M - 64; m < M; ++m) sample.push_back(m);
  for (Index m = 1; m < 64; ++m) sample.push_back(m * (M / 64) + 17);
  std::vector<double> x;
  std::vector<moe::naive::Routed> routed;
  std::vector<float> got;
  for (Index m : sample) {
    for (Index c = 0; c < H; ++c) {
      x.push_back(moe::to_float(hidden[m * H + c]));
      got.push_back(moe::to_float(out[m * H + c]));
    }
    routed.push_back({{ids[m * k], ids[m * k + 1]}, {weights[m * k], weights[m * k + 1]}});
  }
  const auto round_bf16 = [](double v) { return static_cast<double>(moe::round_to<moe::bfloat16>(static_cast<float>(v))); };
  const std::vector<double> ref = moe::naive::fused_moe(L, x, static_cast<int>(sample.size()), routed, round_bf16);
  EXPECT_GT(moe::testing::max_abs(ref), 0.0);
  EXPECT_TRUE(moe::testing::all_close(got, ref, moe::testing::tolerance<moe::bfloat16>()));
}

}  // namespace
