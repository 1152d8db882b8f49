// CPU experts stage: for one local expert and a block of its rows,
//   GEMM1 (Eigen product) -> epilogue 1 (bias, activation, rounding) -> GEMM2 -> epilogue 2
//   (bias, router weight, rounding).
// Two entries: run_segments (the built-in kernel's: rows already gathered as float, outputs left
// in its workspace for its finalize) and run (moe/stages.h's interface: rows of ElementIO in,
// rows of ElementIO out, what a prepare/finalize written outside the library calls). The
// epilogues are the expression trees of moe/epilogue.h, evaluated by Eigen.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>

#include "moe/cpu/eigen_interop.h"
#include "moe/cpu/options.h"
#include "moe/detail/workspace.h"
#include "moe/epilogue.h"
#include "moe/experts.h"
#include "moe/quant/w8a8.h"
#include "moe/quant/mxfp4.h"
#include "moe/quant/weight_only.h"
#include "moe/stages.h"
#include "moe/tensor.h"

namespace moe::cpu {

// Eigen evaluation context of an epilogue over a [rows, cols] block.
template <class Activation>
struct BlockContext {
  using EigenBlock = ::Eigen::Array<float, ::Eigen::Dynamic, ::Eigen::Dynamic, ::Eigen::RowMajor>;
  const float* acc;       // accumulator block, row stride `ld`
  Index rows, cols, ld;   // cols = output width (I after a gated activation)
  bool interleaved;       // gate/up interleaved (gate at even columns)
  const float* bias;      // float bias of the full accumulator width, or nullptr
  const float* weight;    // router weight per row, or nullptr
  const typename Activation::Arguments* activation;

  template <epilogue::Part P>
  ConstSpacedArray accumulator_block() const { return part(acc, rows, ld, P); }
  template <epilogue::Part P>
  auto bias_block() const { return part(bias, 1, 0, P).replicate(rows, 1); }
  auto router_weight_block() const { return ::Eigen::Map<const ::Eigen::ArrayXf>(weight, rows).replicate(1, cols); }
  template <class A>
  const typename A::Arguments& activation_arguments() const { return *activation; }

 private:
  ConstSpacedArray part(const float* base, Index r, Index row_stride, epilogue::Part p) const {
    using S = ::Eigen::Stride<::Eigen::Dynamic, ::Eigen::Dynamic>;
    if (p == epilogue::Part::kAll) return ConstSpacedArray(base, r, cols, S(row_stride, 1));
    const bool up = p == epilogue::Part::kUp;
    if (interleaved) return ConstSpacedArray(base + (up ? 1 : 0), r, cols, S(row_stride, 2));
    return ConstSpacedArray(base + (up ? cols : 0), r, cols, S(row_stride, 1));
  }
};

template <class Experts, class ElementIO>
struct ExpertsStage {
  using Activation = typename Experts::Activation;
  using Quant = typename Experts::Quant;
  using W = typename Quant::WeightElement;
  using Intermediate = typename Experts::ElementIntermediate;
  static constexpr bool kConvertWeights = !std::is_same_v<W, float>;

  struct Params {
    HostView<const W, 3> w13;  // [E_local, N1, H]
    HostView<const W, 3> w2;   // [E_local, H, I]
    std::optional<HostView<const ElementIO, 2>> w13_bias, w2_bias;
    typename Activation::Arguments activation;
    typename Quant::template Arguments<HostSpace> quant;
    Index hidden, intermediate, gemm1_width;
  };

  // Per-thread scratch: float copies of one expert's weights (when stored narrower than float)
  // and of its biases, the one-row case's rows, and a quantized scheme's rows of one block of up
  // to `row_block` rows.
  static Index thread_scratch_floats(const Params& p, Index row_block) {
    return quant_scratch_offset(p) + quant_scratch_floats(p, std::max<Index>(2, row_block));
  }

  // Rows [begin, begin + n) of `input` ([rows, H] float) belong to local expert e. Writes the
  // activated intermediate to `intermediate` ([rows, I]) and the GEMM2 result to `output`
  // ([rows, >= H], row stride ld_out), which may alias the GEMM1 accumulator scratch `acc1`
  // ([rows, >= N1], same row stride). `row_weight` (per row, or nullptr) multiplies GEMM2's output.
  static void run_block(const Params& p, Index e, Index begin, Index n, const float* input, float* acc1,
                        float* intermediate, float* output, Index ld_out, const float* row_weight,
                        float* thread_scratch) {
    if (n == 0) return;
    const Index H = p.hidden, I = p.intermediate, N1 = p.gemm1_width;
    if (n == 1) {
      // Eigen evaluates a one-row product as a matrix-vector product, whose summation order
      // differs from its matrix-matrix kernel: run the row as a two-row block (the row twice)
      // so a token's result does not depend on how many rows share its expert or chunk.
      float* s = thread_scratch + quant_scratch_offset(p) - single_row_scratch_floats(p);
      const Index ld = std::max(N1, H);
      float* in2 = s;
      float* acc2 = in2 + 2 * H;
      float* inter2 = acc2 + 2 * ld;
      float* w2row = inter2 + 2 * I;
      std::copy_n(input + begin * H, H, in2);
      std::copy_n(input + begin * H, H, in2 + H);
      if (row_weight) w2row[0] = w2row[1] = row_weight[begin];
      run_block(p, e, 0, 2, in2, acc2, inter2, acc2, ld, row_weight ? w2row : nullptr, thread_scratch);
      std::copy_n(inter2, I, intermediate + begin * I);
      std::copy_n(acc2, H, output + begin * ld_out);
      return;
    }
    float* bias13 = thread_scratch;
    float* bias2 = bias13 + N1;
    float* panel13 = bias2 + H;
    float* panel2 = panel13 + N1 * H;
    if (p.w13_bias) convert_to_float<ElementIO>(HostView<const ElementIO, 2>((*p.w13_bias)[e].data(), {1, N1}), bias13);
    if (p.w2_bias) convert_to_float<ElementIO>(HostView<const ElementIO, 2>((*p.w2_bias)[e].data(), {1, H}), bias2);

    ConstStridedMap w13 = weights(p, p.w13[e], H, e, true, panel13);
    ConstStridedMap w2 = weights(p, p.w2[e], I, e, false, panel2);
    ::Eigen::Map<const MatrixRM> a(input + begin * H, n, H);

    // GEMM1 + epilogue 1.
    StridedMap c1(acc1 + begin * ld_out, n, N1, ::Eigen::OuterStride<>(ld_out));
    [[maybe_unused]] float* qs = thread_scratch + quant_scratch_offset(p);
    if constexpr (Quant::kQuantized) {
      scaled_product(input + begin * H, n, H, w13, p.quant.w13_scale[e], static_scale(p.quant.a13_scale), c1, qs,
                     N1 == 2 * I ? I : 0);
    } else {
      c1.noalias() = a * w13.transpose();
    }
    ::Eigen::Map<ArrayRM> act(intermediate + begin * I, n, I);
    const BlockContext<Activation> ctx1{c1.data(), n, I, ld_out, Activation::kLayout == GateUpLayout::kInterleaved,
                                        bias13, nullptr, &p.activation};
    if (p.w13_bias) {
      act = epilogue::Gemm1Epilogue<Activation, Intermediate, true>::eigen(ctx1);
    } else {
      act = epilogue::Gemm1Epilogue<Activation, Intermediate, false>::eigen(ctx1);
    }

    // GEMM2 + epilogue 2 (in place: each element reads only its own accumulator).
    StridedMap c2(output + begin * ld_out, n, H, ::Eigen::OuterStride<>(ld_out));
    if constexpr (Quant::kQuantized) {
      scaled_product(act.data(), n, I, w2, p.quant.w2_scale[e], static_scale(p.quant.a2_scale), c2, qs);
    } else {
      c2.noalias() = act.matrix() * w2.transpose();
    }
    const BlockContext<Activation> ctx2{c2.data(), n, H, ld_out, false, bias2,
                                        row_weight ? row_weight + begin : nullptr, &p.activation};
    auto out = c2.array();
    const bool has_bias = p.w2_bias.has_value();
    if (row_weight != nullptr) {
      if (has_bias) out = epilogue::Gemm2Epilogue<ElementIO, true, true>::eigen(ctx2);
      else out = epilogue::Gemm2Epilogue<ElementIO, false, true>::eigen(ctx2);
    } else {
      if (has_bias) out = epilogue::Gemm2Epilogue<ElementIO, true, false>::eigen(ctx2);
      else out = epilogue::Gemm2Epilogue<ElementIO, false, false>::eigen(ctx2);
    }
  }

  // Every segment of rows through run_block, in parallel over (expert, block of row_block rows).
  // Segment e is rows [begin[e], begin[e] + count[e]) of `input`; `tasks` holds 3 Index per task
  // (at most task_bound(rows, E, row_block) tasks); `thread_scratch` thread_scratch_floats(p) per
  // thread.
  static Index task_bound(Index rows, Index num_local, Index row_block) {
    return num_local + (rows + row_block - 1) / std::max<Index>(1, row_block);
  }
  static void run_segments(const Params& p, Index num_local, const Index* begin, const Index* count,
                           const float* input, float* acc, float* intermediate, Index ld, const float* row_weight,
                           Index* tasks, float* thread_scratch, const Options& options) {
    Index num_tasks = 0;
    for (Index e = 0; e < num_local; ++e) {
      for (Index r = 0; r < count[e]; r += options.row_block) {
        tasks[3 * num_tasks + 0] = e;
        tasks[3 * num_tasks + 1] = begin[e] + r;
        tasks[3 * num_tasks + 2] = std::min(options.row_block, count[e] - r);
        ++num_tasks;
      }
    }
    const Index scratch = thread_scratch_floats(p, options.row_block);
    parallel_for(num_tasks, options.num_threads, [&](std::int64_t t, int thread) {
      run_block(p, tasks[3 * t], tasks[3 * t + 1], tasks[3 * t + 2], input, acc, intermediate, acc, ld, row_weight,
                thread_scratch + thread * scratch);
    });
  }

  // ---- moe/stages.h's interface --------------------------------------------------------------
  using Weights = ExpertWeights<Experts, ElementIO, HostSpace>;
  using Rows = ExpertRows<ElementIO, HostSpace>;

  static std::size_t workspace_bytes(const Weights& w, const Rows& r, const Options& options = {}) {
    return layout(params_of(w), r.input.extent(0), options).total;
  }

  // output row r = GEMM2's output of input row r (unweighted, rounded to ElementIO) for every row
  // of every segment; other rows are not written. Checks first: on an error nothing is written.
  static Status run(const Weights& w, const Rows& r, std::span<std::byte> workspace, const Options& options = {}) {
    if (options.num_threads < 1) return invalid_argument("options.num_threads: expected >= 1, got ", options.num_threads);
    if (options.row_block < 1) return invalid_argument("options.row_block: expected >= 1, got ", options.row_block);
    MOE_RETURN_IF_ERROR(validate_expert_rows(w, r));
    const Params p = params_of(w);
    const Index R = r.input.extent(0), E = w.num_local_experts(), H = p.hidden;
    const StageLayout l = layout(p, R, options);
    MOE_RETURN_IF_ERROR(check_workspace(workspace.size(), l.total));
    std::byte* base = detail::WorkspaceCarver<64>::aligned_base(workspace.data());
    auto* begin = reinterpret_cast<Index*>(base + l.begin);
    auto* count = reinterpret_cast<Index*>(base + l.count);
    auto* input = reinterpret_cast<float*>(base + l.input);
    for (Index e = 0; e < E; ++e) {  // clamp to [0, R): a bad segment never addresses outside the rows
      begin[e] = std::clamp<Index>(r.seg_begin(e), 0, R);
      count[e] = std::clamp<Index>(r.seg_count(e), 0, R - begin[e]);
      for (Index row = begin[e]; row < begin[e] + count[e]; ++row) {
        for (Index c = 0; c < H; ++c) input[row * H + c] = to_float(r.input(row, c));
      }
    }
    const float* acc = run_planned(l.core, p, E, begin, count, input, nullptr, base + l.core_base, options);
    for (Index e = 0; e < E; ++e) {  // GEMM2's epilogue rounded each value to ElementIO: exact
      for (Index row = begin[e]; row < begin[e] + count[e]; ++row) {
        for (Index c = 0; c < H; ++c) r.output(row, c) = from_float<ElementIO>(acc[row * l.core.ld + c]);
      }
    }
    return Status::ok();
  }

  // The kernel's entry: rows already as float, segments already in bounds. Plan: the regions
  // (offsets from an aligned base) of the accumulators, the intermediate, the task list and the
  // per-thread scratch for up to `rows` rows.
  struct Plan {
    Index ld = 0;  // row stride of the accumulators: max(GEMM1 width, H)
    std::size_t acc, inter, tasks, thread, total;
  };
  static Plan plan(const Params& p, Index rows, const Options& options) {
    detail::WorkspaceCarver<64> carver;
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    Plan l;
    l.ld = std::max(p.gemm1_width, p.hidden);
    l.acc = carver.take(n(rows) * n(l.ld) * sizeof(float));
    l.inter = carver.take(n(rows) * n(p.intermediate) * sizeof(float));
    l.tasks = carver.take(3 * n(task_bound(rows, p.w13.extent(0), options.row_block)) * sizeof(Index));
    l.thread = carver.take(n(options.num_threads) * n(thread_scratch_floats(p, options.row_block)) * sizeof(float));
    l.total = carver.total();
    return l;
  }
  // GEMM2's outputs (times row_weight when given; rounded to ElementIO, stored as float) of every
  // segment's rows of `input` ([rows, H]); returns them, row r at [r * plan.ld].
  static const float* run_planned(const Plan& l, const Params& p, Index num_local, const Index* begin,
                                  const Index* count, const float* input, const float* row_weight, std::byte* base,
                                  const Options& options) {
    auto* acc = reinterpret_cast<float*>(base + l.acc);
    run_segments(p, num_local, begin, count, input, acc, reinterpret_cast<float*>(base + l.inter), l.ld, row_weight,
                 reinterpret_cast<Index*>(base + l.tasks), reinterpret_cast<float*>(base + l.thread), options);
    return acc;
  }

 private:
  struct StageLayout {
    Plan core;
    std::size_t begin, count, input, core_base, total;
  };
  static Params params_of(const Weights& w) {
    return {w.w13, w.w2, w.w13_bias, w.w2_bias, w.activation, w.quant, w.hidden(), w.intermediate(), w.w13.extent(1)};
  }
  static StageLayout layout(const Params& p, Index rows, const Options& options) {
    detail::WorkspaceCarver<64> carver;
    const auto n = [](Index v) { return static_cast<std::size_t>(std::max<Index>(0, v)); };
    const Index E = p.w13.extent(0);
    StageLayout l;
    l.core = plan(p, rows, options);
    l.begin = carver.take(n(E) * sizeof(Index));
    l.count = carver.take(n(E) * sizeof(Index));
    l.input = carver.take(n(rows) * n(p.hidden) * sizeof(float));
    l.core_base = carver.take(l.core.total);
    l.total = carver.total();
    return l;
  }
  // Where a quantized scheme's block scratch starts: after the biases, the weight panels and the
  // one-row case's rows.
  static Index quant_scratch_offset(const Params& p) {
    const Index panels = kConvertWeights ? p.gemm1_width * p.hidden + p.hidden * p.intermediate : 0;
    return p.gemm1_width + p.hidden + panels + single_row_scratch_floats(p);
  }
  // A quantized scheme's scratch for `rows` rows: their codes and scales, one K block's product
  // and (INT8) its exact running sum as int32.
  static Index quant_scratch_floats(const Params& p, Index rows) {
    if constexpr (!Quant::kQuantized) {
      return 0;
    } else {
      const Index k = std::max(p.hidden, p.intermediate), n = std::max(p.gemm1_width, p.hidden);
      static_assert(sizeof(std::int32_t) == sizeof(float));
      return rows * k + rows * Quant::k_blocks(k) + rows * n + (kExactIntegerSums ? rows * n : 0);
    }
  }

  // ---- the quantized schemes' GEMM (moe/quant/w8a8.h spells out the arithmetic) ----------------
  static constexpr bool kExactIntegerSums = std::is_integral_v<W>;
  // INT8 products summed in float are exact while a partial sum stays below 2^24: chunks of 1024
  // (1024 * 128 * 128 = 2^24), their sums added in int32: the int32 accumulation, exactly.
  static constexpr Index kExactChunk = 1024;

  static std::optional<float> static_scale(const std::optional<HostView<const float, 1>>& s) {
    if constexpr (Quant::kStaticActivations) return s ? std::optional<float>((*s)(0)) : std::nullopt;
    return std::nullopt;
  }

  // c [n, N] = the scheme's product of rows `x` ([n, K], IO-rounded floats) with the codes `w`
  // ([N, K], as floats) under weight scales `ws` (this expert's [N or 1 or N-blocks, K-blocks];
  // `half` > 0: a gated w13 whose halves are blocked separately).
  static void scaled_product(const float* x, Index n, Index K, const ConstStridedMap& w, HostView<const float, 2> ws,
                             std::optional<float> static_scale, StridedMap& c, float* scratch, Index half = 0) {
    const Index N = w.rows(), kb = Quant::k_blocks(K), block_k = Quant::kBlockK > 0 ? Quant::kBlockK : K;
    float* q = scratch;                        // [n, K] codes
    float* qscale = q + n * K;                 // [n, kb]
    float* partial = qscale + n * kb;          // [n, N]
    auto* exact = reinterpret_cast<std::int32_t*>(partial + n * N);  // [n, N] (INT8)
    for (Index r = 0; r < n; ++r) {
      for (Index b = 0; b < kb; ++b) {
        const Index k0 = b * block_k, k1 = std::min(K, k0 + block_k);
        float s = 0.0f;
        if (static_scale) {
          s = *static_scale;
        } else {
          float amax = 0.0f;
          for (Index k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[r * K + k]));
          s = quant::dynamic_scale<W>(amax);
        }
        qscale[r * kb + b] = s;
        for (Index k = k0; k < k1; ++k) q[r * K + k] = Quant::quantize(x[r * K + k], s);
      }
    }
    const auto weight_scale = [&](Index col, Index b) {
      return ws(Quant::weight_scale_row(col, half), Quant::kWeightScale == quant::ScaleGranularity::kBlock ? b : 0);
    };
    ::Eigen::Map<const MatrixRM> qa(q, n, K);
    StridedMap part(partial, n, N, ::Eigen::OuterStride<>(N));
    c.setZero();
    for (Index b = 0; b < kb; ++b) {
      const Index k0 = b * block_k, width = std::min(K, k0 + block_k) - k0;
      if constexpr (kExactIntegerSums) {
        std::fill_n(exact, n * N, 0);
        for (Index c0 = 0; c0 < width; c0 += kExactChunk) {
          const Index cw = std::min(kExactChunk, width - c0);
          part.noalias() = qa.middleCols(k0 + c0, cw) * w.middleCols(k0 + c0, cw).transpose();
          for (Index i = 0; i < n * N; ++i) exact[i] += static_cast<std::int32_t>(partial[i]);
        }
        for (Index i = 0; i < n * N; ++i) partial[i] = static_cast<float>(exact[i]);
      } else {
        part.noalias() = qa.middleCols(k0, width) * w.middleCols(k0, width).transpose();
      }
      for (Index r = 0; r < n; ++r) {
        const float sx = qscale[r * kb + b];
        for (Index col = 0; col < N; ++col) c(r, col) += partial[r * N + col] * sx * weight_scale(col, b);
      }
    }
  }

  // Scratch of the one-row case: two input rows, two accumulator rows, two intermediate rows
  // and two router weights.
  static Index single_row_scratch_floats(const Params& p) {
    return 2 * p.hidden + 2 * std::max(p.gemm1_width, p.hidden) + 2 * p.intermediate + 2;
  }

  // Expert e's weight matrix of GEMM1 (`first`) or GEMM2, with reduction length k, as float:
  // mapped in place for float storage, else dequantized into the thread's panel (weight-only
  // schemes: per group, moe/quant/weight_only.h).
  static ConstStridedMap weights(const Params& p, HostView<const W, 2> w, Index k, Index e, bool first, float* panel) {
    if constexpr (quant::weight_only_v<Quant>) {
      const auto scale = first ? p.quant.w13_scale[e] : p.quant.w2_scale[e];
      // Per group: the integer schemes' zero point and float scale, or MXFP4's E8M0 scale.
      const Index group = group_size(p.quant, k);
      const std::int32_t* order = nullptr;  // act-order: code c is the weight of hidden column order[c]
      if constexpr (requires { p.quant.w13_k_order; }) {
        if (first && p.quant.w13_k_order) order = &(*p.quant.w13_k_order)(e, 0);
      }
      for (Index r = 0; r < w.extent(0); ++r) {
        const std::uint8_t* src = &w(r, 0);
        float* dst = panel + r * k;
        for (Index g = 0; g * group < k; ++g) {
          const auto value = [&](unsigned code) {
            if constexpr (std::is_same_v<Quant, quant::Mxfp4>) {
              return Quant::template dequantize<ElementIO>(code, scale(r, g));
            } else {
              const auto& zeros = first ? p.quant.w13_zero : p.quant.w2_zero;
              const unsigned zero = zeros ? (*zeros)(e, r, g) : Quant::kDefaultZero;
              return Quant::template dequantize<ElementIO>(Quant::offset_code(code, p.quant.signed_codes), zero, scale(r, g));
            }
          };
          for (Index c = g * group; c < std::min(k, (g + 1) * group); ++c) dst[order ? order[c] : c] = value(Quant::code(src, c));
        }
      }
      return ConstStridedMap(panel, w.extent(0), k, ::Eigen::OuterStride<>(k));
    } else {
      return weights(w, panel);
    }
  }
  template <class Args>
  static Index group_size(const Args& a, Index k) {
    if constexpr (std::is_same_v<Quant, quant::Mxfp4>) return quant::Mxfp4::kBlock;
    else return a.group_size > 0 ? a.group_size : k;
  }
  static ConstStridedMap weights(HostView<const W, 2> w, float* panel) {
    if constexpr (kConvertWeights) {
      for (Index r = 0; r < w.extent(0); ++r) {
        const W* src = &w(r, 0);
        float* dst = panel + r * w.extent(1);
        for (Index c = 0; c < w.extent(1); ++c) dst[c] = Quant::dequantize_weight(src[c]);
      }
      return ConstStridedMap(panel, w.extent(0), w.extent(1), ::Eigen::OuterStride<>(w.extent(1)));
    } else {
      return ConstStridedMap(w.data(), w.extent(0), w.extent(1), ::Eigen::OuterStride<>(w.stride(0)));
    }
  }
};

}  // namespace moe::cpu
