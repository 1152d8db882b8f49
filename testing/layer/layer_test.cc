// moe::layer::MoeLayer on tiny random Hugging Face checkpoints of every supported architecture,
// against the independent double-precision reference (hf_reference.h): routing (ids exactly,
// weights to 1e-5 relative), the output in f32 and bf16, expert- and tensor-parallel partial
// outputs adding up to the full layer, and explicit router logits.
//
// Tolerances (relative to the largest |reference| output):
//   f32  1e-4. The layer widens the BF16 checkpoint exactly to f32 and accumulates in float over
//        at most H = 64 and I (or S) <= 48 terms; each such sum is off by ~sqrt(n) * 2^-24 of the
//        sum of |terms| (< 1e-6 relative); the softmax/sigmoid of f32 logits adds a few 1e-7.
//        Measured: <= 5e-7 on every case. 1e-4 leaves two orders of magnitude of margin, and a
//        real bug (a wrong weight, a missing bias, the wrong gate/up half, the router weight on
//        the output instead of the input) moves the output by O(1) of max|ref|.
//   bf16 2e-2. The compute dtype rounds to bf16 (8 significant bits, relative step 2^-8 = 0.4%):
//        the hidden states on entry, the gated activation between the GEMMs, each expert's and
//        the shared expert's output, and the final sum (Llama-4 also rounds s * x). Each rounding
//        is at most 2^-9 relative to its value, and a handful of them compound; measured <= 7.5e-3.
//        2e-2 of max|ref| (the harness's bf16 tolerance) bounds that while still catching an O(1)
//        bug. The router stays f32 (logits from the f32 hidden states), so the ids are still exact.
//   topk_weights 1e-5 relative. The router logits (|logit| up to ~20 with the writer's N(0, 1)
//        router and N(0, 1) hidden states) are f32 dot products over H = 64 terms, off by ~1e-6
//        absolute; softmax turns that into the same relative error on the weights. Measured
//        <= 4.4e-6 (deterministic: fixed seeds).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "moe/layer/rank_group_layer.h"
#include "testing/layer/hf_reference.h"
#include "testing/lib/compare.h"
#include "moe/io/synthetic_checkpoint.h"
#include "testing/lib/random.h"

namespace moe {
namespace {

using layer::MoeLayer;
using layer::ParallelLayout;
using io::HfCheckpointWriter;
using io::HfLayerSpec;

constexpr double kF32Tol = 1e-4;
constexpr double kBF16Tol = 2e-2;
constexpr double kF16Tol = 4e-3;
constexpr double kWeightRelTol = 1e-5;
// EP/TP partial sums: the same f32 kernels on subsets; only the float order of the final
// additions differs (one more rounding of ~2^-24 relative per rank).
constexpr double kPartialTol = 1e-5;

struct Case {
  std::string name;
  HfLayerSpec spec;
};

HfLayerSpec spec_of(std::string arch) {
  HfLayerSpec s;
  s.architecture = std::move(arch);
  return s;
}

std::vector<Case> all_cases() {
  std::vector<Case> v;
  v.push_back({"mixtral", spec_of("MixtralForCausalLM")});
  for (bool norm : {true, false}) {
    Case q2{std::string("qwen2_norm_") + (norm ? "on" : "off"), spec_of("Qwen2MoeForCausalLM")};
    q2.spec.norm_topk_prob = norm;
    v.push_back(q2);
    Case q3{std::string("qwen3_norm_") + (norm ? "on" : "off"), spec_of("Qwen3MoeForCausalLM")};
    q3.spec.norm_topk_prob = norm;
    v.push_back(q3);
  }
  for (const char* method : {"greedy", "group_limited_greedy"}) {
    Case c{std::string("deepseek_v2_") + method, spec_of("DeepseekV2ForCausalLM")};
    c.spec.topk_method = method;
    v.push_back(c);
  }
  for (bool norm : {true, false}) {
    Case c{std::string("deepseek_v3_norm_") + (norm ? "on" : "off"), spec_of("DeepseekV3ForCausalLM")};
    c.spec.norm_topk_prob = norm;
    v.push_back(c);
  }
  v.push_back({"gpt_oss_bf16", spec_of("GptOssForCausalLM")});
  Case mx{"gpt_oss_mxfp4", spec_of("GptOssForCausalLM")};
  mx.spec.mxfp4 = true;
  v.push_back(mx);
  Case l4{"llama4", spec_of("Llama4ForCausalLM")};
  l4.spec.top_k = 1;
  v.push_back(l4);
  // Storage other than BF16: an F32 checkpoint, and more experts/tokens than groups.
  Case f32{"qwen3_f32_storage", spec_of("Qwen3MoeForCausalLM")};
  f32.spec.dtype = DType::kF32;
  v.push_back(f32);
  Case big{"deepseek_v3_e16_k4", spec_of("DeepseekV3ForCausalLM")};
  big.spec.num_experts = 16;
  big.spec.top_k = 4;
  big.spec.n_group = 4;
  big.spec.topk_group = 3;
  v.push_back(big);
  return v;
}

// A checkpoint on disk, opened, with its parsed configs.
struct Model {
  std::string dir;
  HfLayerSpec spec;
  std::string prefix;
  io::Json config_json;
  layer::ModelConfig config;
  io::Checkpoint ckpt;
};

std::unique_ptr<Model> make_model(const std::string& name, const HfLayerSpec& spec) {
  auto m = std::make_unique<Model>();
  m->dir = testing::hf::make_test_dir("layer_" + name);
  m->spec = spec;
  HfCheckpointWriter w(spec);
  const Status ws = w.write(m->dir);
  EXPECT_TRUE(ws.is_ok()) << ws.to_string();
  m->prefix = w.prefix();
  const Status ps = io::parse_json(testing::hf::read_text(m->dir + "/config.json"), &m->config_json);
  EXPECT_TRUE(ps.is_ok()) << ps.to_string();
  const Status cs = layer::load_model_config(m->dir + "/config.json", &m->config);
  EXPECT_TRUE(cs.is_ok()) << cs.to_string();
  const Status os = io::Checkpoint::open({m->dir + "/model.safetensors"}, &m->ckpt);
  EXPECT_TRUE(os.is_ok()) << os.to_string();
  return m;
}

std::vector<float> hidden_states(Index M, Index H, std::uint64_t seed) {
  testing::Random rng(seed);
  return rng.normal_vector<float>(static_cast<std::size_t>(M * H));
}

AnyTensor f32_tensor(const std::vector<float>& v, Index rows, Index cols) {
  return AnyTensor{const_cast<float*>(v.data()), DType::kF32, {rows, cols}, {}};
}

std::vector<double> output_of(const MoeLayer::Result& r) {
  const layer::Buffer& b = r.output;
  Index n = 1;
  for (Index e : b.shape) n *= e;
  std::vector<double> out(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    switch (b.dtype) {
      case DType::kF32: out[i] = reinterpret_cast<const float*>(b.bytes.data())[i]; break;
      case DType::kBF16: out[i] = to_float(reinterpret_cast<const bfloat16*>(b.bytes.data())[i]); break;
      case DType::kF16: out[i] = to_float(reinterpret_cast<const half*>(b.bytes.data())[i]); break;
      default: ADD_FAILURE() << "output dtype " << to_string(b.dtype);
    }
  }
  return out;
}

::testing::AssertionResult weights_close(const std::vector<float>& got, const std::vector<double>& want, double rel) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(got[i] - want[i]);
    if (!(d <= rel * std::abs(want[i]) + 1e-30)) {
      return ::testing::AssertionFailure() << "weight " << i << ": got " << got[i] << ", expected " << want[i]
                                           << " (relative diff " << d / std::abs(want[i]) << " > " << rel << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

Status load(const Model& m, const ParallelLayout& par, DType dtype, MoeLayer* l) {
  return MoeLayer::load(m.config, par, dtype, m.ckpt, m.prefix, l);
}

class LayerTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { model_ = make_model(GetParam().name, GetParam().spec); }
  std::unique_ptr<Model> model_;
};

// ---- against the reference ----------------------------------------------------------------------

TEST_P(LayerTest, MatchesReferenceF32) {
  const Model& m = *model_;
  MoeLayer l;
  ASSERT_TRUE(load(m, {}, DType::kF32, &l).is_ok());
  for (Index M : {1, 16, 37}) {
    SCOPED_TRACE("M=" + std::to_string(M));
    const std::vector<float> x = hidden_states(M, m.spec.hidden, 100 + M);
    MoeLayer::Result r;
    const Status s = l.forward(f32_tensor(x, M, m.spec.hidden), std::nullopt, &r);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    const testing::hf::RefResult ref = testing::hf::reference_forward(m.config_json, m.ckpt, m.prefix, x, M);
    EXPECT_EQ(r.topk_ids, ref.topk_ids);
    EXPECT_TRUE(weights_close(r.topk_weights, ref.topk_weights, kWeightRelTol));
    EXPECT_EQ(r.output.dtype, DType::kF32);
    EXPECT_EQ(r.output.shape, (std::vector<Index>{M, m.spec.hidden}));
    EXPECT_TRUE(testing::all_close(output_of(r), ref.output, {1e-6, kF32Tol}));
  }
}

TEST_P(LayerTest, MatchesReferenceBF16) {
  const Model& m = *model_;
  MoeLayer l;
  ASSERT_TRUE(load(m, {}, DType::kBF16, &l).is_ok());
  const Index M = 24;
  const std::vector<float> x = hidden_states(M, m.spec.hidden, 7);
  MoeLayer::Result r;
  const Status s = l.forward(f32_tensor(x, M, m.spec.hidden), std::nullopt, &r);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  const testing::hf::RefResult ref = testing::hf::reference_forward(m.config_json, m.ckpt, m.prefix, x, M);
  EXPECT_EQ(r.topk_ids, ref.topk_ids);
  EXPECT_TRUE(weights_close(r.topk_weights, ref.topk_weights, kWeightRelTol));
  EXPECT_EQ(r.output.dtype, DType::kBF16);
  EXPECT_TRUE(testing::all_close(output_of(r), ref.output, {1e-3, kBF16Tol}));
}

// f16 compute: 11 significant bits, the same rounding points as bf16; 4e-3 of max|ref| (the
// harness's f16 tolerance, 8x the 2^-11 step) bounds a handful of compounded roundings.
TEST_P(LayerTest, MatchesReferenceF16) {
  const Model& m = *model_;
  MoeLayer l;
  ASSERT_TRUE(load(m, {}, DType::kF16, &l).is_ok());
  const Index M = 24;
  const std::vector<float> x = hidden_states(M, m.spec.hidden, 8);
  MoeLayer::Result r;
  const Status s = l.forward(f32_tensor(x, M, m.spec.hidden), std::nullopt, &r);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  const testing::hf::RefResult ref = testing::hf::reference_forward(m.config_json, m.ckpt, m.prefix, x, M);
  EXPECT_EQ(r.topk_ids, ref.topk_ids);
  EXPECT_TRUE(weights_close(r.topk_weights, ref.topk_weights, kWeightRelTol));
  EXPECT_EQ(r.output.dtype, DType::kF16);
  EXPECT_TRUE(testing::all_close(output_of(r), ref.output, {1e-4, kF16Tol}));
}

// hidden_states given in bf16 (f32 compute): the same as f32 hidden states holding those values.
TEST_P(LayerTest, Bf16HiddenStatesInput) {
  const Model& m = *model_;
  const Index M = 8, H = m.spec.hidden;
  MoeLayer l;
  ASSERT_TRUE(load(m, {}, DType::kF32, &l).is_ok());
  std::vector<float> x = hidden_states(M, H, 11);
  std::vector<bfloat16> xb(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    xb[i] = bfloat16(x[i]);
    x[i] = to_float(xb[i]);
  }
  MoeLayer::Result a, b;
  ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &a).is_ok());
  ASSERT_TRUE(l.forward(AnyTensor{xb.data(), DType::kBF16, {M, H}, {}}, std::nullopt, &b).is_ok());
  EXPECT_EQ(a.topk_ids, b.topk_ids);
  EXPECT_EQ(a.topk_weights, b.topk_weights);
  EXPECT_EQ(a.output.bytes, b.output.bytes);
}

// ---- parallel layouts ---------------------------------------------------------------------------

TEST_P(LayerTest, ExpertParallelPartialsSumToFull) {
  const Model& m = *model_;
  const Index M = 32, H = m.spec.hidden;
  const std::vector<float> x = hidden_states(M, H, 21);
  MoeLayer full;
  ASSERT_TRUE(load(m, {}, DType::kF32, &full).is_ok());
  MoeLayer::Result fr;
  ASSERT_TRUE(full.forward(f32_tensor(x, M, H), std::nullopt, &fr).is_ok());
  const std::vector<double> want = output_of(fr);
  for (int ep : {2, 3}) {
    for (ExpertPlacement pl : {ExpertPlacement::kLinear, ExpertPlacement::kRoundRobin}) {
      SCOPED_TRACE("ep_size " + std::to_string(ep) + (pl == ExpertPlacement::kLinear ? " linear" : " round_robin"));
      std::vector<double> sum(want.size(), 0.0);
      Index local_total = 0;
      for (int rank = 0; rank < ep; ++rank) {
        ParallelLayout par;
        par.ep_size = ep;
        par.ep_rank = rank;
        par.placement = pl;
        MoeLayer l;
        const Status ls = load(m, par, DType::kF32, &l);
        ASSERT_TRUE(ls.is_ok()) << ls.to_string();
        local_total += l.num_local_experts();
        MoeLayer::Result r;
        ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &r).is_ok());
        EXPECT_EQ(r.topk_ids, fr.topk_ids) << "rank " << rank;  // global ids on every rank
        EXPECT_EQ(r.topk_weights, fr.topk_weights) << "rank " << rank;
        const std::vector<double> part = output_of(r);
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
      }
      EXPECT_EQ(local_total, m.spec.num_experts);
      EXPECT_TRUE(testing::all_close(sum, want, {1e-7, kPartialTol}));
    }
  }
}

TEST_P(LayerTest, TensorParallelPartialsSumToFull) {
  const Model& m = *model_;
  const Index M = 32, H = m.spec.hidden;
  const std::vector<float> x = hidden_states(M, H, 31);
  MoeLayer full;
  ASSERT_TRUE(load(m, {}, DType::kF32, &full).is_ok());
  MoeLayer::Result fr;
  ASSERT_TRUE(full.forward(f32_tensor(x, M, H), std::nullopt, &fr).is_ok());
  const std::vector<double> want = output_of(fr);
  int tested = 0;
  for (int tp : {2, 4}) {
    if (m.config.intermediate % tp != 0 || m.config.shared_intermediate % tp != 0) continue;
    ++tested;
    SCOPED_TRACE("tp_size " + std::to_string(tp));
    std::vector<double> sum(want.size(), 0.0);
    for (int rank = 0; rank < tp; ++rank) {
      ParallelLayout par;
      par.tp_size = tp;
      par.tp_rank = rank;
      MoeLayer l;
      const Status ls = load(m, par, DType::kF32, &l);
      ASSERT_TRUE(ls.is_ok()) << ls.to_string();
      MoeLayer::Result r;
      ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &r).is_ok());
      EXPECT_EQ(r.topk_ids, fr.topk_ids);
      EXPECT_EQ(r.topk_weights, fr.topk_weights);
      const std::vector<double> part = output_of(r);
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
    EXPECT_TRUE(testing::all_close(sum, want, {1e-7, kPartialTol}));
  }
  EXPECT_EQ(tested, 2) << "I=" << m.config.intermediate << " S=" << m.config.shared_intermediate;
}

// EP and TP together: the ep_size * tp_size partials add up to the full layer.
TEST_P(LayerTest, ExpertAndTensorParallelTogether) {
  const Model& m = *model_;
  const Index M = 16, H = m.spec.hidden;
  const std::vector<float> x = hidden_states(M, H, 41);
  MoeLayer full;
  ASSERT_TRUE(load(m, {}, DType::kF32, &full).is_ok());
  MoeLayer::Result fr;
  ASSERT_TRUE(full.forward(f32_tensor(x, M, H), std::nullopt, &fr).is_ok());
  const std::vector<double> want = output_of(fr);
  std::vector<double> sum(want.size(), 0.0);
  for (int er = 0; er < 2; ++er)
    for (int tr = 0; tr < 2; ++tr) {
      ParallelLayout par;
      par.ep_size = 2;
      par.ep_rank = er;
      par.tp_size = 2;
      par.tp_rank = tr;
      par.placement = ExpertPlacement::kRoundRobin;
      MoeLayer l;
      ASSERT_TRUE(load(m, par, DType::kF32, &l).is_ok());
      MoeLayer::Result r;
      ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &r).is_ok());
      const std::vector<double> part = output_of(r);
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
  EXPECT_TRUE(testing::all_close(sum, want, {1e-7, kPartialTol}));
}

// EPLB over in-process ranks (RankGroupLayer): replicas keep the output (the partial sums of the
// ranks differ only in float order, as the EP test above); the load counts each routed slot
// once on its logical expert; rebalancing moves the experts and keeps the output; and the
// next placement is what rebalance_experts gives for the recorded load.
TEST_P(LayerTest, EplbReplicasAndRebalancingKeepTheOutput) {
  const Model& m = *model_;
  const Index M = 24, H = m.spec.hidden, E = m.config.num_experts;
  const std::vector<float> x = hidden_states(M, H, 61);
  MoeLayer full;
  ASSERT_TRUE(load(m, {}, DType::kF32, &full).is_ok());
  MoeLayer::Result fr;
  ASSERT_TRUE(full.forward(f32_tensor(x, M, H), std::nullopt, &fr).is_ok());
  const std::vector<double> want = output_of(fr);
  std::vector<std::pair<int, int>> sizes = {{2, 1}};
  if (m.config.intermediate % 2 == 0 && m.config.shared_intermediate % 2 == 0 && !m.spec.mxfp4) sizes.push_back({2, 2});
  for (const auto& [ep, tp] : sizes) {
    SCOPED_TRACE("ep " + std::to_string(ep) + " tp " + std::to_string(tp));
    ParallelLayout lay;
    lay.ep_size = ep;
    lay.tp_size = tp;
    lay.redundant_experts = 2 * ep - E % ep;  // (E + R) divisible by ep
    layer::RankGroupLayer g;
    const Status ls = layer::RankGroupLayer::load(m.config, lay, DType::kF32, m.ckpt, m.prefix, &g);
    ASSERT_TRUE(ls.is_ok()) << ls.to_string();
    ASSERT_TRUE(g.rank(0).has_eplb());
    MoeLayer::Result r;
    ASSERT_TRUE(g.forward(f32_tensor(x, M, H), std::nullopt, &r).is_ok());
    EXPECT_EQ(r.topk_ids, fr.topk_ids);  // logical ids, as without EPLB
    EXPECT_TRUE(testing::all_close(output_of(r), want, {1e-7, kPartialTol}));
    // The load: every slot of every token once, on a replica of its logical expert.
    const parallel::EplbPlacement before = *g.rank(0).eplb_placement();
    const std::vector<std::int64_t> physical = g.rank(0).expert_load();
    std::vector<std::int64_t> logical(static_cast<std::size_t>(E), 0), routed(static_cast<std::size_t>(E), 0);
    for (Index p = 0; p < before.num_physical; ++p) logical[before.physical_to_logical[p]] += physical[p];
    for (std::int32_t id : fr.topk_ids) ++routed[id];
    EXPECT_EQ(logical, routed);
    for (int rank = 1; rank < g.size(); ++rank) EXPECT_EQ(g.rank(rank).expert_load(), physical) << "rank " << rank;
    // Rebalance: the placement rebalance_experts gives for that load, and the same output.
    const Status rs = g.rebalance();
    ASSERT_TRUE(rs.is_ok()) << rs.to_string();
    std::vector<double> load(routed.begin(), routed.end());
    parallel::EplbPlacement expected;
    ASSERT_TRUE(parallel::rebalance_experts(load, before.num_physical, 1, 1, ep, &expected).is_ok());
    EXPECT_NE(expected.physical_to_logical, before.physical_to_logical) << "the test's load moves no expert";
    for (int rank = 0; rank < g.size(); ++rank) {
      EXPECT_EQ(g.rank(rank).eplb_placement()->physical_to_logical, expected.physical_to_logical) << "rank " << rank;
      EXPECT_EQ(g.rank(rank).expert_load(), std::vector<std::int64_t>(static_cast<std::size_t>(before.num_physical), 0));
    }
    MoeLayer::Result after;
    ASSERT_TRUE(g.forward(f32_tensor(x, M, H), std::nullopt, &after).is_ok());
    EXPECT_EQ(after.topk_ids, fr.topk_ids);
    EXPECT_TRUE(testing::all_close(output_of(after), want, {1e-7, kPartialTol}));
  }
}

// All-to-all dispatch (vLLM's all2all backends): each EP rank holds a share of the tokens, its rows
// travel to the ranks holding their experts and back, and every rank adds the shared expert for
// its own tokens. The whole output, ids and weights are the single-rank layer's, bit for bit
// (the combine is the kernel's finalize: same slot order, same roundings), in both modes, with
// and without EPLB replicas, in f32 and bf16, given the router logits. Logits the layer computes
// come from a GEMM over each rank's share, whose float order depends on the share's size (Eigen's
// blocking), so there the ids match and the output within kPartialTol. Rebalancing sums the
// ranks' own loads.
TEST_P(LayerTest, AllToAllDispatchMatchesOneRankBitwise) {
  const Model& m = *model_;
  const Index M = 19, H = m.spec.hidden, E = m.config.num_experts;  // 19: shares of 5 and 4 tokens at 4 ranks
  const Index routed_total = E + m.config.num_zero_experts;
  const std::vector<float> x = hidden_states(M, H, 71);
  testing::Random rng(73);
  const std::vector<float> logits = rng.gapped_logits(M, routed_total, 0.3f);
  for (DType dt : {DType::kF32, DType::kBF16}) {
    MoeLayer full;
    ASSERT_TRUE(load(m, {}, dt, &full).is_ok());
    MoeLayer::Result want, want_computed;
    ASSERT_TRUE(full.forward(f32_tensor(x, M, H), f32_tensor(logits, M, routed_total), &want).is_ok());
    ASSERT_TRUE(full.forward(f32_tensor(x, M, H), std::nullopt, &want_computed).is_ok());
    for (int ep : {2, 4}) {
      for (layer::EpDispatch dispatch : {layer::EpDispatch::kAllToAll, layer::EpDispatch::kAllToAllLowLatency}) {
        for (Index redundant : {Index{0}, 2 * ep - E % ep}) {
          SCOPED_TRACE(std::string(to_string(dt)) + " ep " + std::to_string(ep) + (dispatch == layer::EpDispatch::kAllToAll ? " normal" : " low latency") +
                       " redundant " + std::to_string(redundant));
          ParallelLayout lay;
          lay.ep_size = ep;
          lay.dispatch = dispatch;
          lay.redundant_experts = redundant;
          layer::RankGroupLayer g;
          const Status ls = layer::RankGroupLayer::load(m.config, lay, dt, m.ckpt, m.prefix, &g);
          if (redundant == 0 && E % ep != 0) {  // ranks would own unequal ranges
            EXPECT_EQ(ls.code(), StatusCode::kInvalidArgument);
            EXPECT_NE(ls.message().find("divisible by ep_size"), std::string::npos) << ls.to_string();
            continue;
          }
          if (redundant > 0 && m.config.num_zero_experts > 0) {
            EXPECT_FALSE(ls.is_ok());  // EPLB refuses zero experts (tested with the EPLB cases)
            continue;
          }
          ASSERT_TRUE(ls.is_ok()) << ls.to_string();
          MoeLayer::Result r;
          const Status fs = g.forward(f32_tensor(x, M, H), f32_tensor(logits, M, routed_total), &r);
          ASSERT_TRUE(fs.is_ok()) << fs.to_string();
          EXPECT_EQ(r.topk_ids, want.topk_ids);
          EXPECT_EQ(r.topk_weights, want.topk_weights);
          ASSERT_EQ(r.output.bytes.size(), want.output.bytes.size());
          EXPECT_TRUE(r.output.bytes == want.output.bytes) << "outputs differ in their bits";
          MoeLayer::Result computed;
          ASSERT_TRUE(g.forward(f32_tensor(x, M, H), std::nullopt, &computed).is_ok());
          EXPECT_EQ(computed.topk_ids, want_computed.topk_ids);
          EXPECT_TRUE(testing::all_close(output_of(computed), output_of(want_computed),
                                         {1e-7, dt == DType::kF32 ? kPartialTol : kBF16Tol}));
          if (redundant == 0) continue;
          for (int rank = 0; rank < g.size(); ++rank) g.mutable_rank(rank)->reset_expert_load();
          ASSERT_TRUE(g.forward(f32_tensor(x, M, H), f32_tensor(logits, M, routed_total), &r).is_ok());
          // Each rank counted its own tokens; the group's load is their sum, one per routed slot.
          const parallel::EplbPlacement before = *g.rank(0).eplb_placement();
          std::vector<std::int64_t> logical(static_cast<std::size_t>(E), 0), routed(static_cast<std::size_t>(E), 0);
          for (int rank = 0; rank < g.size(); ++rank) {
            const std::vector<std::int64_t> physical = g.rank(rank).expert_load();
            for (Index p = 0; p < before.num_physical; ++p) logical[before.physical_to_logical[p]] += physical[p];
          }
          for (std::int32_t id : want.topk_ids) ++routed[id];
          EXPECT_EQ(logical, routed);
          ASSERT_TRUE(g.rebalance().is_ok());
          parallel::EplbPlacement expected;
          ASSERT_TRUE(parallel::rebalance_experts(std::vector<double>(routed.begin(), routed.end()), before.num_physical, 1, 1, ep,
                                                  &expected).is_ok());
          EXPECT_EQ(g.rank(0).eplb_placement()->physical_to_logical, expected.physical_to_logical);
          MoeLayer::Result after;
          ASSERT_TRUE(g.forward(f32_tensor(x, M, H), f32_tensor(logits, M, routed_total), &after).is_ok());
          EXPECT_TRUE(after.output.bytes == want.output.bytes) << "outputs differ in their bits after rebalancing";
        }
      }
    }
  }
}

// Fewer tokens than ranks (empty shares), and none at all: the same bits as one rank.
TEST_P(LayerTest, AllToAllWithEmptyShares) {
  const Model& m = *model_;
  if (m.config.num_experts % 4 != 0) GTEST_SKIP() << "four ranks need E divisible by 4 (the bitwise test covers the refusal)";
  const Index H = m.spec.hidden, routed_total = m.config.num_experts + m.config.num_zero_experts;
  MoeLayer full;
  ASSERT_TRUE(load(m, {}, DType::kBF16, &full).is_ok());
  for (layer::EpDispatch dispatch : {layer::EpDispatch::kAllToAll, layer::EpDispatch::kAllToAllLowLatency}) {
    ParallelLayout lay;
    lay.ep_size = 4;
    lay.dispatch = dispatch;
    layer::RankGroupLayer g;
    ASSERT_TRUE(layer::RankGroupLayer::load(m.config, lay, DType::kBF16, m.ckpt, m.prefix, &g).is_ok());
    for (Index M : {0, 1, 3}) {
      SCOPED_TRACE("M = " + std::to_string(M));
      const std::vector<float> x = hidden_states(M, H, 74);
      testing::Random rng(75);
      const std::vector<float> logits = rng.gapped_logits(M, routed_total, 0.3f);
      MoeLayer::Result want, r;
      ASSERT_TRUE(full.forward(f32_tensor(x, M, H), f32_tensor(logits, M, routed_total), &want).is_ok());
      const Status s = g.forward(f32_tensor(x, M, H), f32_tensor(logits, M, routed_total), &r);
      ASSERT_TRUE(s.is_ok()) << s.to_string();
      EXPECT_EQ(r.output.shape, want.output.shape);
      EXPECT_TRUE(r.output.bytes == want.output.bytes);
      EXPECT_EQ(r.topk_ids, want.topk_ids);
    }
  }
}

// The all-to-all layout's own refusals, each naming what is wrong, and the two entry points kept
// apart.
TEST_P(LayerTest, AllToAllLayoutErrors) {
  const Model& m = *model_;
  const Index M = 4, H = m.spec.hidden;
  const std::vector<float> x = hidden_states(M, H, 72);
  ParallelLayout lay;
  lay.dispatch = layer::EpDispatch::kAllToAll;
  lay.tp_size = 2;
  MoeLayer l;
  Status s = load(m, lay, DType::kF32, &l);
  EXPECT_EQ(s.code(), StatusCode::kUnsupported);
  EXPECT_NE(s.message().find("tp_size 1"), std::string::npos) << s.to_string();
  lay.tp_size = 1;
  lay.ep_size = 2;
  lay.placement = ExpertPlacement::kRoundRobin;
  s = load(m, lay, DType::kF32, &l);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("round_robin"), std::string::npos) << s.to_string();
  // One rank holding every expert: forward refuses, forward_all_to_all over a group of one runs.
  lay = {};
  lay.dispatch = layer::EpDispatch::kAllToAll;
  ASSERT_TRUE(load(m, lay, DType::kF32, &l).is_ok());
  MoeLayer::Result r;
  s = l.forward(f32_tensor(x, M, H), std::nullopt, &r);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("forward_all_to_all"), std::string::npos) << s.to_string();
  std::unique_ptr<parallel::InProcessGroup> one, two;
  ASSERT_TRUE(parallel::InProcessGroup::create(1, &one).is_ok());
  ASSERT_TRUE(parallel::InProcessGroup::create(2, &two).is_ok());
  s = one->run([&](parallel::Communicator& comm) { return l.forward_all_to_all(comm, M - 1, f32_tensor(x, M, H), std::nullopt, &r); });
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("max_tokens_per_rank"), std::string::npos) << s.to_string();
  s = two->run([&](parallel::Communicator& comm) { return l.forward_all_to_all(comm, M, f32_tensor(x, M, H), std::nullopt, &r); });
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("EP ranks"), std::string::npos) << s.to_string();
  s = one->run([&](parallel::Communicator& comm) { return l.forward_all_to_all(comm, M, f32_tensor(x, M, H), std::nullopt, &r); });
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  MoeLayer full;
  ASSERT_TRUE(load(m, {}, DType::kF32, &full).is_ok());
  MoeLayer::Result want;
  ASSERT_TRUE(full.forward(f32_tensor(x, M, H), std::nullopt, &want).is_ok());
  EXPECT_TRUE(r.output.bytes == want.output.bytes);
  // A partial-sums layer does not take the all-to-all entry.
  MoeLayer p;
  ASSERT_TRUE(load(m, {}, DType::kF32, &p).is_ok());
  s = one->run([&](parallel::Communicator& comm) { return p.forward_all_to_all(comm, M, f32_tensor(x, M, H), std::nullopt, &r); });
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("partial sums"), std::string::npos) << s.to_string();
}

// ---- explicit router logits ---------------------------------------------------------------------

TEST_P(LayerTest, ExplicitRouterLogitsMatchComputed) {
  const Model& m = *model_;
  const Index M = 16, H = m.spec.hidden, E = m.spec.num_experts;
  const std::vector<float> x = hidden_states(M, H, 51);
  MoeLayer l;
  ASSERT_TRUE(load(m, {}, DType::kF32, &l).is_ok());
  // W x (+ b), from the reference (double), rounded once to f32.
  const testing::hf::RefResult ref = testing::hf::reference_forward(m.config_json, m.ckpt, m.prefix, x, M);
  std::vector<float> logits(ref.logits.begin(), ref.logits.end());
  MoeLayer::Result computed, given;
  ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &computed).is_ok());
  const Status s = l.forward(f32_tensor(x, M, H), f32_tensor(logits, M, E), &given);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(given.topk_ids, computed.topk_ids);
  EXPECT_EQ(given.topk_ids, ref.topk_ids);
  // The two logits differ only by f32 accumulation order (~1e-6 absolute).
  std::vector<double> computed_w(computed.topk_weights.begin(), computed.topk_weights.end());
  EXPECT_TRUE(weights_close(given.topk_weights, computed_w, kWeightRelTol));
  EXPECT_TRUE(weights_close(given.topk_weights, ref.topk_weights, kWeightRelTol));
  EXPECT_TRUE(testing::all_close(output_of(given), output_of(computed), {1e-7, kPartialTol}));
  EXPECT_TRUE(testing::all_close(output_of(given), ref.output, {1e-6, kF32Tol}));
}

// Router logits unrelated to the weights: routing follows them (reference fed the same logits).
TEST_P(LayerTest, ArbitraryRouterLogitsDriveRouting) {
  const Model& m = *model_;
  const Index M = 16, H = m.spec.hidden, E = m.spec.num_experts;
  const std::vector<float> x = hidden_states(M, H, 61);
  testing::Random rng(62);
  const std::vector<float> logits = rng.gapped_logits(M, E, 0.3f);
  const std::vector<double> logits_d(logits.begin(), logits.end());
  MoeLayer l;
  ASSERT_TRUE(load(m, {}, DType::kF32, &l).is_ok());
  MoeLayer::Result r;
  ASSERT_TRUE(l.forward(f32_tensor(x, M, H), f32_tensor(logits, M, E), &r).is_ok());
  const testing::hf::RefResult ref = testing::hf::reference_forward(m.config_json, m.ckpt, m.prefix, x, M, &logits_d);
  EXPECT_EQ(r.topk_ids, ref.topk_ids);
  EXPECT_TRUE(weights_close(r.topk_weights, ref.topk_weights, kWeightRelTol));
  EXPECT_TRUE(testing::all_close(output_of(r), ref.output, {1e-6, kF32Tol}));
}

TEST_P(LayerTest, ZeroTokens) {
  const Model& m = *model_;
  MoeLayer l;
  ASSERT_TRUE(load(m, {}, DType::kF32, &l).is_ok());
  std::vector<float> x;
  MoeLayer::Result r;
  const Status s = l.forward(AnyTensor{x.data(), DType::kF32, {0, m.spec.hidden}, {}}, std::nullopt, &r);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_TRUE(r.topk_ids.empty());
  EXPECT_TRUE(r.topk_weights.empty());
  EXPECT_EQ(r.output.shape, (std::vector<Index>{0, m.spec.hidden}));
}

INSTANTIATE_TEST_SUITE_P(Architectures, LayerTest, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// ---- single cases ------------------------------------------------------------------------------

// gpt-oss under TP: the down-projection bias is added by tp rank 0 only. Against the same
// checkpoint with down_proj_bias zeroed: rank 1's output is unchanged, rank 0's grows by exactly
// sum_j w_j * down_bias[e_j].
// EPLB layouts the layer cannot take are errors naming the field.
TEST(Eplb, BadLayoutsNameTheField) {
  auto m = make_model("eplb_bad", spec_of("MixtralForCausalLM"));
  const Index E = m->config.num_experts;
  struct Bad {
    ParallelLayout layout;
    const char* field;
  };
  std::vector<Bad> bad;
  ParallelLayout p;
  p.ep_size = 0;  // checked before the physical experts are divided over it
  p.redundant_experts = 2;
  bad.push_back({p, "ep_size"});
  p.ep_size = 2;
  p.redundant_experts = -1;
  bad.push_back({p, "redundant_experts"});
  p.redundant_experts = 1;  // E + 1 physical experts over 2 ranks
  bad.push_back({p, "redundant_experts"});
  p.redundant_experts = 2;
  p.placement = ExpertPlacement::kRoundRobin;
  bad.push_back({p, "placement"});
  p.placement = ExpertPlacement::kLinear;
  p.physical_to_logical.assign(static_cast<std::size_t>(E + 2), 0);  // only logical expert 0
  bad.push_back({p, "physical_to_logical"});
  p.physical_to_logical.assign(static_cast<std::size_t>(E + 1), 0);  // wrong length
  bad.push_back({p, "physical_to_logical"});
  for (const Bad& b : bad) {
    MoeLayer l;
    const Status s = load(*m, b.layout, DType::kF32, &l);
    EXPECT_NE(s.to_string().find(b.field), std::string::npos) << b.field << ": " << s.to_string();
  }
  // A given placement is used as given.
  p.physical_to_logical.clear();
  for (Index q = 0; q < E + 2; ++q) p.physical_to_logical.push_back(static_cast<std::int32_t>((q * 3) % E));
  MoeLayer l;
  ASSERT_TRUE(load(*m, p, DType::kF32, &l).is_ok());
  EXPECT_EQ(l.eplb_placement()->physical_to_logical, p.physical_to_logical);
  EXPECT_EQ(l.num_local_experts(), (E + 2) / 2);
}

TEST(GptOss, DownBiasOnlyOnTensorParallelRankZero) {
  auto m = make_model("gpt_oss_tp_bias", spec_of("GptOssForCausalLM"));
  const Index M = 4, H = m->spec.hidden;
  const std::vector<float> x = hidden_states(M, H, 71);
  std::vector<double> ranks[2];
  for (int rank = 0; rank < 2; ++rank) {
    ParallelLayout par;
    par.tp_size = 2;
    par.tp_rank = rank;
    MoeLayer l;
    ASSERT_TRUE(load(*m, par, DType::kF32, &l).is_ok());
    MoeLayer::Result r;
    ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &r).is_ok());
    ranks[rank] = output_of(r);
  }
  const std::string src = m->dir + "/model.safetensors", nobias_dir = testing::hf::make_test_dir("gpt_oss_nobias");
  ASSERT_TRUE(testing::hf::rewrite_safetensors(src, nobias_dir + "/model.safetensors", [](testing::hf::EditableTensor& t) {
                if (t.name.ends_with("experts.down_proj_bias")) std::fill(t.bytes.begin(), t.bytes.end(), 0);
              }).is_ok());
  io::Checkpoint nobias;
  ASSERT_TRUE(io::Checkpoint::open({nobias_dir + "/model.safetensors"}, &nobias).is_ok());
  std::vector<double> unbiased[2];
  MoeLayer::Result routed;
  for (int rank = 0; rank < 2; ++rank) {
    ParallelLayout par;
    par.tp_size = 2;
    par.tp_rank = rank;
    MoeLayer l;
    ASSERT_TRUE(MoeLayer::load(m->config, par, DType::kF32, nobias, m->prefix, &l).is_ok());
    ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &routed).is_ok());
    unbiased[rank] = output_of(routed);
  }
  // Rank 1 never adds the bias; rank 0 adds sum_j w_j * down_bias[e_j].
  EXPECT_TRUE(testing::all_close(ranks[1], unbiased[1], {1e-7, 1e-6}));
  const std::vector<double> b = testing::hf::read_tensor(m->ckpt, m->prefix + ".mlp.experts.down_proj_bias",
                                                         {m->spec.num_experts, H});
  std::vector<double> expect0(ranks[0].size());
  for (Index t = 0; t < M; ++t)
    for (Index h = 0; h < H; ++h) {
      double bias = 0;
      for (int j = 0; j < m->spec.top_k; ++j) {
        bias += routed.topk_weights[t * m->spec.top_k + j] * b[routed.topk_ids[t * m->spec.top_k + j] * H + h];
      }
      expect0[t * H + h] = unbiased[0][t * H + h] + bias;
    }
  EXPECT_TRUE(testing::all_close(ranks[0], expect0, {1e-6, 1e-5}));
}

// The shared expert under EP is computed on ep rank 0 only: a rank that owns no routed expert
// chosen by a token still returns zero for it unless it is rank 0.
TEST(SharedExpert, OnlyOnExpertParallelRankZero) {
  for (const char* arch : {"Qwen2MoeForCausalLM", "DeepseekV2ForCausalLM", "Llama4ForCausalLM"}) {
    SCOPED_TRACE(arch);
    HfLayerSpec spec = spec_of(arch);
    if (std::string(arch) == "Llama4ForCausalLM") spec.top_k = 1;
    auto m = make_model(std::string("shared_ep_") + arch, spec);
    const Index M = 16, H = spec.hidden, E = spec.num_experts;
    const std::vector<float> x = hidden_states(M, H, 81);
    // Route every token to expert 0 (linear placement: on rank 0 of 2).
    std::vector<float> logits(static_cast<std::size_t>(M * E), -4.0f);
    for (Index t = 0; t < M; ++t)
      for (Index e = 0; e < E; ++e) logits[t * E + e] = -0.5f * static_cast<float>(e);
    ParallelLayout par;
    par.ep_size = 2;
    par.ep_rank = 1;
    MoeLayer l;
    ASSERT_TRUE(load(*m, par, DType::kF32, &l).is_ok());
    MoeLayer::Result r;
    ASSERT_TRUE(l.forward(f32_tensor(x, M, H), f32_tensor(logits, M, E), &r).is_ok());
    // Rank 1 owns experts 4..7; the top-2 are 0 and 1: its output is all zero.
    for (double v : output_of(r)) ASSERT_EQ(v, 0.0);
  }
}

// DeepSeek-V3: groups outside the best topk_group are masked to -inf, so the experts come from
// the kept groups even when their biased scores are negative (a mask of 0.0 would pick masked
// experts instead). Biases -0.1 * (e + 1) and scores ~ sigmoid(-5): every choice is negative;
// the kept groups are {0, 1} and {2, 3}, so the top-2 are experts 0 and 1.
TEST(DeepseekV3, MaskedGroupsLoseToNegativeChoices) {
  auto m = make_model("deepseek_v3_mask", spec_of("DeepseekV3ForCausalLM"));
  const Index M = 4, H = m->spec.hidden, E = m->spec.num_experts;
  const std::string dir = testing::hf::make_test_dir("deepseek_v3_mask_edit");
  ASSERT_TRUE(testing::hf::rewrite_safetensors(m->dir + "/model.safetensors", dir + "/model.safetensors",
                                               [&](testing::hf::EditableTensor& t) {
                                                 if (!t.name.ends_with("e_score_correction_bias")) return;
                                                 ASSERT_EQ(t.dtype, DType::kF32);
                                                 for (Index e = 0; e < E; ++e) {
                                                   const float b = -0.1f * static_cast<float>(e + 1);
                                                   std::memcpy(&t.bytes[4 * e], &b, 4);
                                                 }
                                               })
                  .is_ok());
  io::Checkpoint ckpt;
  ASSERT_TRUE(io::Checkpoint::open({dir + "/model.safetensors"}, &ckpt).is_ok());
  MoeLayer l;
  ASSERT_TRUE(MoeLayer::load(m->config, {}, DType::kF32, ckpt, m->prefix, &l).is_ok());
  std::vector<float> logits(static_cast<std::size_t>(M * E));
  for (Index t = 0; t < M; ++t)
    for (Index e = 0; e < E; ++e) logits[t * E + e] = -5.0f - 0.05f * static_cast<float>((e + t) % E);
  const std::vector<double> logits_d(logits.begin(), logits.end());
  const std::vector<float> x = hidden_states(M, H, 96);
  MoeLayer::Result r;
  ASSERT_TRUE(l.forward(f32_tensor(x, M, H), f32_tensor(logits, M, E), &r).is_ok());
  const testing::hf::RefResult ref = testing::hf::reference_forward(m->config_json, ckpt, m->prefix, x, M, &logits_d);
  for (Index t = 0; t < M; ++t) {
    EXPECT_EQ(r.topk_ids[2 * t], 0) << "token " << t;
    EXPECT_EQ(r.topk_ids[2 * t + 1], 1) << "token " << t;
  }
  EXPECT_EQ(r.topk_ids, ref.topk_ids);
  EXPECT_TRUE(weights_close(r.topk_weights, ref.topk_weights, kWeightRelTol));
  EXPECT_TRUE(testing::all_close(output_of(r), ref.output, {1e-6, kF32Tol}));
}

// gpt-oss's swiglu_limit comes from config.json: a small limit clamps most gate/up values.
TEST(GptOss, SwigluLimitFromConfig) {
  auto m = make_model("gpt_oss_limit", spec_of("GptOssForCausalLM"));
  for (double limit : {0.25, 1.5}) {
    SCOPED_TRACE("swiglu_limit " + std::to_string(limit));
    io::Json j = m->config_json;
    j.set("swiglu_limit", limit);
    const std::string path = m->dir + "/config_limit.json";
    testing::hf::write_text(path, j.dump());
    layer::ModelConfig c;
    ASSERT_TRUE(layer::load_model_config(path, &c).is_ok());
    MoeLayer l;
    ASSERT_TRUE(MoeLayer::load(c, {}, DType::kF32, m->ckpt, m->prefix, &l).is_ok());
    const Index M = 16, H = m->spec.hidden;
    const std::vector<float> x = hidden_states(M, H, 97);
    MoeLayer::Result r;
    ASSERT_TRUE(l.forward(f32_tensor(x, M, H), std::nullopt, &r).is_ok());
    const testing::hf::RefResult ref = testing::hf::reference_forward(j, m->ckpt, m->prefix, x, M);
    EXPECT_EQ(r.topk_ids, ref.topk_ids);
    EXPECT_TRUE(testing::all_close(output_of(r), ref.output, {1e-6, kF32Tol}));
    // And it differs from the default limit's output (the limit is in effect).
    const testing::hf::RefResult def = testing::hf::reference_forward(m->config_json, m->ckpt, m->prefix, x, M);
    EXPECT_FALSE(testing::all_close(def.output, ref.output, {1e-6, kF32Tol}));
  }
}

// Llama4ForConditionalGeneration nests the text model's keys under text_config.
TEST(Llama4, ConditionalGenerationReadsTextConfig) {
  HfLayerSpec spec = spec_of("Llama4ForCausalLM");
  spec.top_k = 1;
  auto m = make_model("llama4_multimodal", spec);
  io::Json outer = io::Json::object();
  io::Json archs = io::Json::array();
  archs.push_back("Llama4ForConditionalGeneration");
  outer.set("architectures", archs);
  io::Json text = m->config_json;
  outer.set("text_config", text);
  outer.set("vision_config", io::Json::object());
  const std::string path = m->dir + "/config_multimodal.json";
  testing::hf::write_text(path, outer.dump());
  layer::ModelConfig c;
  const Status s = layer::load_model_config(path, &c);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(c.architecture, layer::Architecture::kLlama4);
  EXPECT_EQ(c.hidden, spec.hidden);
  EXPECT_EQ(c.num_experts, spec.num_experts);
  EXPECT_EQ(c.top_k, 1);
  MoeLayer l;
  ASSERT_TRUE(MoeLayer::load(c, {}, DType::kF32, m->ckpt, m->prefix, &l).is_ok());
  const Index M = 8;
  const std::vector<float> x = hidden_states(M, spec.hidden, 91);
  MoeLayer::Result r;
  ASSERT_TRUE(l.forward(f32_tensor(x, M, spec.hidden), std::nullopt, &r).is_ok());
  const testing::hf::RefResult ref = testing::hf::reference_forward(outer, m->ckpt, m->prefix, x, M);
  EXPECT_EQ(r.topk_ids, ref.topk_ids);
  EXPECT_TRUE(testing::all_close(output_of(r), ref.output, {1e-6, kF32Tol}));
}

// The prefix may name the block itself ("model.layers.3.mlp") instead of the decoder layer.
TEST(Prefix, BlockPrefixEqualsLayerPrefix) {
  auto m = make_model("prefix_block", spec_of("Qwen2MoeForCausalLM"));
  MoeLayer a, b;
  ASSERT_TRUE(load(*m, {}, DType::kF32, &a).is_ok());
  const Status s = MoeLayer::load(m->config, {}, DType::kF32, m->ckpt, m->prefix + ".mlp", &b);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  const Index M = 8, H = m->spec.hidden;
  const std::vector<float> x = hidden_states(M, H, 92);
  MoeLayer::Result ra, rb;
  ASSERT_TRUE(a.forward(f32_tensor(x, M, H), std::nullopt, &ra).is_ok());
  ASSERT_TRUE(b.forward(f32_tensor(x, M, H), std::nullopt, &rb).is_ok());
  EXPECT_EQ(ra.topk_ids, rb.topk_ids);
  EXPECT_EQ(ra.output.bytes, rb.output.bytes);
}

// Sharded checkpoint through a Hugging Face index: same layer as the single file.
TEST(Checkpoint, ShardedThroughIndex) {
  auto m = make_model("sharded", spec_of("MixtralForCausalLM"));
  const std::string src = m->dir + "/model.safetensors";
  io::Json weight_map = io::Json::object();
  for (int shard = 0; shard < 2; ++shard) {
    const std::string name = "model-0000" + std::to_string(shard + 1) + "-of-00002.safetensors";
    ASSERT_TRUE(testing::hf::rewrite_safetensors(src, m->dir + "/" + name, [&](testing::hf::EditableTensor& t) {
                  const bool second = t.name.find(".experts.") != std::string::npos &&
                                      std::stoi(t.name.substr(t.name.find(".experts.") + 9)) >= 4;
                  t.drop = second != (shard == 1);
                  if (!t.drop) weight_map.set(t.name, name);
                }).is_ok());
  }
  io::Json index = io::Json::object();
  index.set("metadata", io::Json::object());
  index.set("weight_map", weight_map);
  testing::hf::write_text(m->dir + "/model.safetensors.index.json", index.dump());
  io::Checkpoint sharded;
  const Status os = io::Checkpoint::open({m->dir + "/model.safetensors.index.json"}, &sharded);
  ASSERT_TRUE(os.is_ok()) << os.to_string();
  EXPECT_EQ(sharded.files().size(), 2u);
  MoeLayer a, b;
  ASSERT_TRUE(load(*m, {}, DType::kF32, &a).is_ok());
  ASSERT_TRUE(MoeLayer::load(m->config, {}, DType::kF32, sharded, m->prefix, &b).is_ok());
  const Index M = 8, H = m->spec.hidden;
  const std::vector<float> x = hidden_states(M, H, 93);
  MoeLayer::Result ra, rb;
  ASSERT_TRUE(a.forward(f32_tensor(x, M, H), std::nullopt, &ra).is_ok());
  ASSERT_TRUE(b.forward(f32_tensor(x, M, H), std::nullopt, &rb).is_ok());
  EXPECT_EQ(ra.output.bytes, rb.output.bytes);
}

// Router logits that are a column slice of a wider buffer (strides given): either the layer
// reads them through the strides or it refuses them; it must not read them as contiguous.
// Regression test for a fixed bug: MoeLayer::forward binds router_logits with its strides but
// then std::memcpy's M*E floats from router_logits->data as if contiguous, so a strided
// (column-slice) tensor is silently misread: here the padding columns (100.0) are routed on.
TEST(RouterLogits, StridedLogitsAreReadThroughStridesOrRefused) {
  auto m = make_model("strided_logits", spec_of("Qwen3MoeForCausalLM"));
  const Index M = 8, H = m->spec.hidden, E = m->spec.num_experts, ld = E + 5;
  const std::vector<float> x = hidden_states(M, H, 94);
  testing::Random rng(95);
  const std::vector<float> logits = rng.gapped_logits(M, E, 0.3f);
  std::vector<float> wide(static_cast<std::size_t>(M * ld), 100.0f);  // padding would win top-k
  for (Index t = 0; t < M; ++t)
    for (Index e = 0; e < E; ++e) wide[t * ld + e] = logits[t * E + e];
  MoeLayer l;
  ASSERT_TRUE(load(*m, {}, DType::kF32, &l).is_ok());
  MoeLayer::Result dense, strided;
  ASSERT_TRUE(l.forward(f32_tensor(x, M, H), f32_tensor(logits, M, E), &dense).is_ok());
  const Status s = l.forward(f32_tensor(x, M, H), AnyTensor{wide.data(), DType::kF32, {M, E}, {ld, 1}}, &strided);
  if (s.is_ok()) {
    EXPECT_EQ(strided.topk_ids, dense.topk_ids);
    EXPECT_TRUE(testing::all_close(output_of(strided), output_of(dense), {0.0, 0.0}));
  } else {
    EXPECT_NE(s.message().find("router_logits"), std::string::npos) << s.message();
  }
}

}  // namespace
}  // namespace moe
