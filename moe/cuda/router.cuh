// The layer's device stages around the experts: the router GEMM, the built-in routing policies with
// one warp per token, and the combine pass (zero experts, a shared expert computed apart).
// Semantics: those of the CPU layer (moe/layer/moe_layer.cc) and of moe/routing.h's route_token;
// only the order of floating-point sums differs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moe/cuda/launch.h"
#include "moe/quant/numeric.h"
#include "moe/routing.h"
#include "moe/tensor.h"

namespace moe::cuda::detail {

// ---- router logits: logits[m, e] = sum_h x[m, h] * w[e, h] (+ bias[e]), fp32 products and sums --

// Decode: one warp per expert row, which it streams once for all (at most kRouterSmallTokens)
// tokens; the row is the bulk of the bytes (E x H fp32).
constexpr int kRouterSmallTokens = 8;
template <class T>
__global__ void __launch_bounds__(256) router_logits_small_kernel(const T* x, int tokens, Index H, const float* w,
                                                                  const float* bias, Index E, float* logits) {
  grid_dependency_wait();
  allow_dependents_launch();
  const Index e = static_cast<Index>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (e >= E) return;
  float acc[kRouterSmallTokens];
#pragma unroll
  for (int m = 0; m < kRouterSmallTokens; ++m) acc[m] = 0.0f;
  const float* row = w + e * H;
  for (Index h = lane; h < H; h += 32) {
    const float wv = __ldg(row + h);
#pragma unroll
    for (int m = 0; m < kRouterSmallTokens; ++m) {
      if (m < tokens) acc[m] += to_float(x[m * H + h]) * wv;
    }
  }
#pragma unroll
  for (int m = 0; m < kRouterSmallTokens; ++m) {
    float v = acc[m];
    for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
    if (lane == 0 && m < tokens) logits[m * E + e] = v + (bias ? bias[e] : 0.0f);
  }
}

// Prefill: 128 tokens x 64 experts per block, K in steps of 16 through shared memory, 8 x 4
// outputs per thread (a SIMT SGEMM: the router is fp32 as in the CPU layer).
constexpr int kRouterTileM = 128, kRouterTileE = 64, kRouterTileK = 16;
template <class T>
__global__ void __launch_bounds__(256) router_logits_tiled_kernel(const T* x, Index M, Index H, const float* w,
                                                                  const float* bias, Index E, float* logits) {
  __shared__ float xs[kRouterTileK][kRouterTileM];
  __shared__ float ws[kRouterTileK][kRouterTileE];
  grid_dependency_wait();
  allow_dependents_launch();
  const Index m0 = static_cast<Index>(blockIdx.x) * kRouterTileM, e0 = static_cast<Index>(blockIdx.y) * kRouterTileE;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // experts tx*4.., tokens ty*8..
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (Index k0 = 0; k0 < H; k0 += kRouterTileK) {
    for (int i = threadIdx.x; i < kRouterTileM * kRouterTileK; i += 256) {
      const int r = i / kRouterTileK, c = i % kRouterTileK;
      const Index m = m0 + r, k = k0 + c;
      xs[c][r] = m < M && k < H ? to_float(x[m * H + k]) : 0.0f;
    }
    for (int i = threadIdx.x; i < kRouterTileE * kRouterTileK; i += 256) {
      const int r = i / kRouterTileK, c = i % kRouterTileK;
      const Index e = e0 + r, k = k0 + c;
      ws[c][r] = e < E && k < H ? w[e * H + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kRouterTileK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&xs[k][ty * 8]);
      const float4 a1 = *reinterpret_cast<const float4*>(&xs[k][ty * 8 + 4]);
      const float4 b = *reinterpret_cast<const float4*>(&ws[k][tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bb[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const Index m = m0 + ty * 8 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const Index e = e0 + tx * 4 + j;
      if (e < E) logits[m * E + e] = acc[i][j] + (bias ? bias[e] : 0.0f);
    }
  }
}

// ---- routing: one warp per token --------------------------------------------------------------
// The built-in policies of moe/routing.h (ScoredTopK<Softmax|Sigmoid>, GroupedTopK<...>,
// Llama4TopK) with E <= kWarpRouteMaxExperts and at most 32 groups: scores and keys in shared
// memory, group keys one lane per group (in the CPU's order, so they are bit-identical), and top-k
// by k rounds of a warp-wide argmax under ranks_before (larger key, then lower id: the CPU's
// ranking). Weight finishing (renormalize, scale) runs on lane 0 in the CPU's order.
//
// After the k routed slots, `appended` slots name always-selected experts (shared experts run as
// extra experts of the grouped GEMM) with ids appended_first_id + s and weight 1, or
// sigmoid(x . shared_gate) when shared_gate is given (Qwen2-MoE); `gate_out`, when given, receives
// that weight per token instead (a shared expert computed apart).
enum class WarpScoring { kSoftmax, kSigmoid, kRawLlama4 };
constexpr int kWarpRouteMaxExperts = 1024;
constexpr int kWarpRouteWarps = 4;

struct WarpRouteParams {
  const float* logits;  // [M, E]
  Index M;
  int E;
  int top_k;
  const float* correction_bias;  // [E] or null
  int groups;                     // > 1: grouped top-k
  int topk_group;
  bool renormalize;
  float routed_scaling_factor;
  int appended;                   // always-selected slots after the routed ones
  int appended_first_id;
  const float* shared_gate;       // [H] or null
  Index H;
  std::int32_t* ids;              // [M, top_k + appended]
  float* weights;                 // [M, top_k + appended]
  float* gate_out;                // [M] or null
};

template <WarpScoring kScoring, class T>
__global__ void __launch_bounds__(32 * kWarpRouteWarps) warp_route_kernel(WarpRouteParams p, const T* x) {
  __shared__ float scores_all[kWarpRouteWarps][kWarpRouteMaxExperts];
  __shared__ float keys_all[kWarpRouteWarps][kWarpRouteMaxExperts];
  grid_dependency_wait();
  allow_dependents_launch();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Index m = static_cast<Index>(blockIdx.x) * kWarpRouteWarps + warp;
  if (m >= p.M) return;
  float* scores = scores_all[warp];
  float* keys = keys_all[warp];
  const float* logits = p.logits + m * p.E;
  const float inf = math::infinity();
  const int E = p.E;
  // Scores.
  if constexpr (kScoring == WarpScoring::kSoftmax) {
    float max_v = -inf;
    int pos_inf = 0;
    for (int i = lane; i < E; i += 32) {
      const float v = math::isnan(logits[i]) ? -inf : logits[i];
      max_v = fmaxf(max_v, v);
      pos_inf += v == inf;
    }
    for (int d = 16; d > 0; d /= 2) {
      max_v = fmaxf(max_v, __shfl_xor_sync(0xffffffffu, max_v, d));
      pos_inf += __shfl_xor_sync(0xffffffffu, pos_inf, d);
    }
    if (max_v == inf || max_v == -inf) {
      for (int i = lane; i < E; i += 32) {
        scores[i] = max_v == inf ? (logits[i] == inf ? 1.0f / static_cast<float>(pos_inf) : 0.0f)
                                 : 1.0f / static_cast<float>(E);
      }
    } else {
      float sum = 0.0f;
      for (int i = lane; i < E; i += 32) {
        const float v = math::isnan(logits[i]) ? -inf : logits[i];
        scores[i] = math::exp(v - max_v);
        sum += scores[i];
      }
      for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
      const float inv = 1.0f / sum;
      for (int i = lane; i < E; i += 32) scores[i] *= inv;
    }
  } else if constexpr (kScoring == WarpScoring::kSigmoid) {
    for (int i = lane; i < E; i += 32) scores[i] = routing::safe_sigmoid(logits[i]);
  } else {  // Llama-4: select on the raw logits, weight sigmoid(logit)
    for (int i = lane; i < E; i += 32) scores[i] = logits[i];
  }
  for (int i = lane; i < E; i += 32) keys[i] = p.correction_bias ? scores[i] + p.correction_bias[i] : scores[i];
  __syncwarp();
  // Grouped: keep the topk_group best groups, mask the rest to -inf.
  if (p.groups > 1) {
    const int per_group = E / p.groups;
    float group_key = -inf;
    if (lane < p.groups) {
      const float* k = keys + lane * per_group;
      if (p.correction_bias) {
        float best = -inf, second = -inf;
        for (int i = 0; i < per_group; ++i) {
          if (routing::ranks_before(k[i], 0, best, 0)) {
            second = best;
            best = k[i];
          } else if (routing::ranks_before(k[i], 0, second, 0)) {
            second = k[i];
          }
        }
        group_key = per_group >= 2 ? best + second : best;
      } else {
        float best = -inf;
        for (int i = 0; i < per_group; ++i) best = math::fmax(best, k[i]);
        group_key = best;
      }
    }
    bool kept = false;
    bool taken = lane >= p.groups;
    for (int round = 0; round < p.topk_group; ++round) {
      float bk = taken ? -inf : group_key;
      int bi = taken ? INT32_MAX : lane;
      for (int d = 16; d > 0; d /= 2) {
        const float ok = __shfl_xor_sync(0xffffffffu, bk, d);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
        if (routing::ranks_before(ok, oi, bk, bi)) {
          bk = ok;
          bi = oi;
        }
      }
      if (lane == bi) {
        kept = true;
        taken = true;
      }
    }
    const unsigned kept_mask = __ballot_sync(0xffffffffu, kept);
    for (int i = lane; i < E; i += 32) {
      if (!((kept_mask >> (i / per_group)) & 1u)) keys[i] = -inf;
    }
    __syncwarp();
  }
  // Top-k: k rounds of a warp argmax over the keys not yet taken (bit j of `taken`: expert lane + 32 j).
  std::uint32_t taken = 0;
  std::int32_t* ids = p.ids + m * (p.top_k + p.appended);
  float* weights = p.weights + m * (p.top_k + p.appended);
  for (int j = 0; j < p.top_k; ++j) {
    float bk = 0.0f;
    int bi = INT32_MAX;
    for (int i = lane, b = 0; i < E; i += 32, ++b) {
      if ((taken >> b) & 1u) continue;
      if (bi == INT32_MAX || routing::ranks_before(keys[i], i, bk, bi)) {
        bk = keys[i];
        bi = i;
      }
    }
    for (int d = 16; d > 0; d /= 2) {
      const float ok = __shfl_xor_sync(0xffffffffu, bk, d);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
      if (oi != INT32_MAX && (bi == INT32_MAX || routing::ranks_before(ok, oi, bk, bi))) {
        bk = ok;
        bi = oi;
      }
    }
    if (bi % 32 == lane) taken |= 1u << (bi / 32);
    if (lane == 0) ids[j] = bi;
  }
  __syncwarp();
  // Shared expert gate: sigmoid(x . gate) in fp32 (warp dot product).
  float gate = 1.0f;
  if (p.shared_gate) {
    float s = 0.0f;
    for (Index h = lane; h < p.H; h += 32) s += to_float(x[m * p.H + h]) * p.shared_gate[h];
    for (int d = 16; d > 0; d /= 2) s += __shfl_xor_sync(0xffffffffu, s, d);
    gate = 1.0f / (1.0f + math::exp(-s));
  }
  if (lane == 0) {
    for (int j = 0; j < p.top_k; ++j) {
      const float sc = scores[ids[j]];
      weights[j] = kScoring == WarpScoring::kRawLlama4 ? routing::safe_sigmoid(sc) : sc;
    }
    if constexpr (kScoring != WarpScoring::kRawLlama4) {
      routing::finish_weights(weights, p.top_k, p.renormalize, p.routed_scaling_factor);
    }
    for (int s = 0; s < p.appended; ++s) {
      ids[p.top_k + s] = p.appended_first_id + s;
      weights[p.top_k + s] = gate;
    }
    if (p.gate_out) p.gate_out[m] = gate;
  }
}

// ---- combine: out = round(y (+ s) + sum over zero-expert slots of w * x) ------------------------
// Zero ("identity") experts are the ids in [zero_first, zero_last); `s` (a shared expert computed
// apart) may be null. One thread per element; the sums in float, in slot order, rounded once.
template <class T>
__global__ void combine_kernel(const T* y, const T* s, const T* x, const std::int32_t* ids, const float* weights,
                               int ld_slots, int top_k, int zero_first, int zero_last, Index M, Index H, T* out) {
  grid_dependency_wait();
  allow_dependents_launch();
  const Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * H) return;
  const Index m = i / H;
  float v = to_float(y[i]);
  if (s) v += to_float(s[i]);
  if (zero_first < zero_last) {
    const float xv = to_float(x[i]);
    for (int j = 0; j < top_k; ++j) {
      const std::int32_t id = ids[m * ld_slots + j];
      if (id >= zero_first && id < zero_last) v += weights[m * ld_slots + j] * xv;
    }
  }
  out[i] = from_float<T>(v);
}

}  // namespace moe::cuda::detail
