// CPU experts stage: for one local expert and a block of its rows,
//   GEMM1 (Eigen product) -> epilogue 1 (bias, activation, rounding) -> GEMM2 -> epilogue 2
//   (bias, router weight, rounding).
// Rows arrive already gathered as float (the prepare step); outputs stay in the workspace for the
// finalize step. The epilogues are the expression trees of moe/epilogue.h, evaluated by Eigen.
#pragma once

#include <algorithm>
#include <optional>

#include "moe/cpu/eigen_interop.h"
#include "moe/epilogue.h"
#include "moe/experts.h"
#include "moe/tensor.h"

namespace moe::cpu {

// Eigen evaluation context of an epilogue over a [rows, cols] block.
template <class Activation>
struct BlockContext {
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
    Index hidden, intermediate, gemm1_width;
  };

  // Per-thread scratch: float copies of one expert's weights (when stored narrower than float)
  // and of its biases.
  static Index thread_scratch_floats(const Params& p) {
    const Index panels = kConvertWeights ? p.gemm1_width * p.hidden + p.hidden * p.intermediate : 0;
    return panels + p.gemm1_width + p.hidden + single_row_scratch_floats(p);
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
      float* s = thread_scratch + thread_scratch_floats(p) - single_row_scratch_floats(p);
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

    ConstStridedMap w13 = weights(p.w13[e], panel13);
    ConstStridedMap w2 = weights(p.w2[e], panel2);
    ::Eigen::Map<const MatrixRM> a(input + begin * H, n, H);

    // GEMM1 + epilogue 1.
    StridedMap c1(acc1 + begin * ld_out, n, N1, ::Eigen::OuterStride<>(ld_out));
    c1.noalias() = a * w13.transpose();
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
    c2.noalias() = act.matrix() * w2.transpose();
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

 private:
  // Scratch of the one-row case: two input rows, two accumulator rows, two intermediate rows
  // and two router weights.
  static Index single_row_scratch_floats(const Params& p) {
    return 2 * p.hidden + 2 * std::max(p.gemm1_width, p.hidden) + 2 * p.intermediate + 2;
  }

  // The expert's weight matrix as float: mapped in place for float storage, else dequantized into
  // the thread's panel.
  static ConstStridedMap weights(HostView<const W, 2> w, float* panel) {
    if constexpr (kConvertWeights) {
      for (Index r = 0; r < w.extent(0); ++r) {
        const W* src = &w(r, 0);
        float* dst = panel + r * w.extent(1);
        for (Index c = 0; c < w.extent(1); ++c) dst[c] = Quant::dequantize_weight(src[c], 1.0f);
      }
      return ConstStridedMap(panel, w.extent(0), w.extent(1), ::Eigen::OuterStride<>(w.extent(1)));
    } else {
      return ConstStridedMap(w.data(), w.extent(0), w.extent(1), ::Eigen::OuterStride<>(w.stride(0)));
    }
  }
};

}  // namespace moe::cpu
