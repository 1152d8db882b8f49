// Zero ("identity") experts, LongCat-Flash style: routing covers E + Z experts; a slot routed to a
// zero expert adds weight * x and runs no GEMM. Checked against a double-precision definition
// written here, also under expert parallelism (the zero-expert term is added on rank 0 only).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "moe/io/safetensors.h"
#include "moe/layer/moe_layer.h"
#include "testing/lib/compare.h"

namespace {

using moe::Index;

struct Files {
  std::string dir;
  Index H = 32, I = 16, E = 6, Z = 3;
  int k = 3;
  std::vector<float> router, gate, up, down;  // [E+Z,H], [E][I,H], [E][I,H], [E][H,I]
};

Files write_checkpoint() {
  Files f;
  const char* tmp = std::getenv("TEST_TMPDIR");
  f.dir = std::string(tmp ? tmp : "/tmp") + "/zero_experts";
  std::filesystem::create_directories(f.dir);
  std::mt19937 gen(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto fill = [&](std::vector<float>& v, std::size_t n, float s) {
    v.resize(n);
    for (auto& x : v) x = s * nd(gen);
  };
  fill(f.router, (f.E + f.Z) * f.H, 0.5f);
  fill(f.gate, f.E * f.I * f.H, 0.2f);
  fill(f.up, f.E * f.I * f.H, 0.2f);
  fill(f.down, f.E * f.H * f.I, 0.2f);
  const std::string p = "model.layers.0.mlp.";
  std::vector<moe::io::NamedTensor> t = {{p + "gate.weight", moe::DType::kF32, {f.E + f.Z, f.H}, f.router.data()}};
  for (Index e = 0; e < f.E; ++e) {
    const std::string n = p + "experts." + std::to_string(e) + ".";
    t.push_back({n + "gate_proj.weight", moe::DType::kF32, {f.I, f.H}, f.gate.data() + e * f.I * f.H});
    t.push_back({n + "up_proj.weight", moe::DType::kF32, {f.I, f.H}, f.up.data() + e * f.I * f.H});
    t.push_back({n + "down_proj.weight", moe::DType::kF32, {f.H, f.I}, f.down.data() + e * f.H * f.I});
  }
  moe::check(moe::io::write_safetensors(f.dir + "/model.safetensors", t));
  std::ofstream(f.dir + "/config.json")
      << R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 32, "moe_intermediate_size": 16,
            "num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": true, "zero_expert_num": 3,
            "zero_expert_type": "identity"})";
  return f;
}

// softmax over E + Z, top-k, renormalize; real experts run silu(gate) * up -> down; zero experts
// contribute weight * x.
std::vector<double> reference(const Files& f, const std::vector<float>& x, Index M) {
  std::vector<double> out(M * f.H, 0.0);
  const Index ER = f.E + f.Z;
  for (Index m = 0; m < M; ++m) {
    std::vector<double> p(ER);
    double mx = -1e300, sum = 0;
    for (Index e = 0; e < ER; ++e) {
      double s = 0;
      for (Index h = 0; h < f.H; ++h) s += double(f.router[e * f.H + h]) * x[m * f.H + h];
      p[e] = s;
      mx = std::max(mx, s);
    }
    for (auto& v : p) sum += (v = std::exp(v - mx));
    for (auto& v : p) v /= sum;
    std::vector<int> idx(ER);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
    double wsum = 0;
    for (int j = 0; j < f.k; ++j) wsum += p[idx[j]];
    for (int j = 0; j < f.k; ++j) {
      const int e = idx[j];
      const double w = p[e] / wsum;
      if (e >= f.E) {
        for (Index h = 0; h < f.H; ++h) out[m * f.H + h] += w * x[m * f.H + h];
        continue;
      }
      std::vector<double> a(f.I);
      for (Index i = 0; i < f.I; ++i) {
        double g = 0, u = 0;
        for (Index h = 0; h < f.H; ++h) {
          g += double(f.gate[(e * f.I + i) * f.H + h]) * x[m * f.H + h];
          u += double(f.up[(e * f.I + i) * f.H + h]) * x[m * f.H + h];
        }
        a[i] = g / (1 + std::exp(-g)) * u;
      }
      for (Index h = 0; h < f.H; ++h) {
        double s = 0;
        for (Index i = 0; i < f.I; ++i) s += double(f.down[(e * f.H + h) * f.I + i]) * a[i];
        out[m * f.H + h] += w * s;
      }
    }
  }
  return out;
}

std::vector<float> as_floats(const moe::layer::Buffer& b) {
  return std::vector<float>(reinterpret_cast<const float*>(b.bytes.data()),
                            reinterpret_cast<const float*>(b.bytes.data()) + b.bytes.size() / 4);
}

TEST(ZeroExperts, MatchReferenceAndSumOverExpertParallelRanks) {
  const Files f = write_checkpoint();
  moe::layer::ModelConfig config;
  ASSERT_TRUE(moe::layer::load_model_config(f.dir + "/config.json", &config).is_ok());
  EXPECT_EQ(config.num_zero_experts, 3);
  moe::io::Checkpoint ckpt;
  ASSERT_TRUE(moe::io::Checkpoint::open({f.dir + "/model.safetensors"}, &ckpt).is_ok());
  const Index M = 50;
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(M * f.H);
  for (auto& v : x) v = nd(gen);
  const moe::AnyTensor hidden{x.data(), moe::DType::kF32, {M, f.H}, {}};

  moe::layer::MoeLayer full;
  ASSERT_TRUE(moe::layer::MoeLayer::load(config, {}, moe::DType::kF32, ckpt, "model.layers.0", &full).is_ok());
  moe::layer::MoeLayer::Result r;
  moe::cpu::Options small_chunks;
  small_chunks.chunk_tokens = 7;  // several chunks: same result
  ASSERT_TRUE(full.forward(hidden, std::nullopt, &r, small_chunks).is_ok());
  int zero_slots = 0;
  for (auto id : r.topk_ids) zero_slots += id >= f.E;
  ASSERT_GT(zero_slots, 10) << "the case must route to zero experts";
  const std::vector<double> ref = reference(f, x, M);
  EXPECT_TRUE(moe::testing::all_close(as_floats(r.output), ref, {1e-5, 1e-4}));

  std::vector<double> sum(M * f.H, 0.0);
  for (int rank = 0; rank < 2; ++rank) {
    moe::layer::ParallelLayout par;
    par.ep_size = 2;
    par.ep_rank = rank;
    moe::layer::MoeLayer part;
    ASSERT_TRUE(moe::layer::MoeLayer::load(config, par, moe::DType::kF32, ckpt, "model.layers.0", &part).is_ok());
    moe::layer::MoeLayer::Result pr;
    ASSERT_TRUE(part.forward(hidden, std::nullopt, &pr).is_ok());
    EXPECT_EQ(pr.topk_ids, r.topk_ids);
    const auto o = as_floats(pr.output);
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += o[i];
  }
  EXPECT_TRUE(moe::testing::all_close(as_floats(r.output), sum, {1e-5, 1e-5}));
}

}  // namespace
