// select_experts, moe_permute and moe_unpermute on the device against the CPU ops.
#include "testing/cuda/ops_test_support.cuh"

namespace {

// ---------------------------------------------------------------------------------------------
// select_experts

template <class Policy>
void check_select(cudaStream_t stream, Index M, Index E, int k, const typename Policy::Arguments& args, bool with_bias,
                  Index pad, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << Policy::kName << " M=" << M << " E=" << E << " k=" << k << " bias=" << with_bias
                                    << " pad=" << pad);
  Random rng(seed);
  const Index ld = E + pad;
  const float gap = std::min(0.05f, 6.0f / static_cast<float>(E));
  const std::vector<float> gapped = rng.gapped_logits(static_cast<std::size_t>(M), static_cast<std::size_t>(E), gap);
  std::vector<float> logits(static_cast<std::size_t>(M * ld), 1e30f);  // padding: selected if ever read
  for (Index m = 0; m < M; ++m) {
    for (Index e = 0; e < E; ++e) logits[m * ld + e] = gapped[m * E + e];
  }
  const std::vector<float> bias = with_bias ? rng.uniform_vector<float>(static_cast<std::size_t>(E), -0.3f, 0.3f)
                                            : std::vector<float>{};
  std::vector<i32> ids(static_cast<std::size_t>(M * k), -7);
  std::vector<float> weights(static_cast<std::size_t>(M * k), -7.0f);
  std::optional<HostView<const float, 1>> h_bias;
  if (with_bias) h_bias = hin1(bias);
  const Status cpu = moe::cpu::select_experts<Policy>(hin(logits, M, E, ld), k, args, h_bias, hout(ids, M, k),
                                                      hout(weights, M, k));
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<float> d_logits(logits), d_bias(bias), d_weights = dbuf<float>(M * k);
  DeviceBuffer<i32> d_ids = dbuf<i32>(M * k);
  moe::cuda::OptDeviceView<const float, 1> dv_bias;
  if (with_bias) dv_bias = din1(d_bias);
  Workspace ws(moe::cuda::select_experts_workspace_bytes(M, E));
  std::vector<float> first_weights;
  for (int run = 0; run < 2; ++run) {
    ws.poison(run);
    d_ids.fill_bytes(kOutputPoison[run]);
    d_weights.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::select_experts<Policy>(din(d_logits, M, E, ld), k, args, dv_bias, dout(d_ids, M, k),
                                                       dout(d_weights, M, k), ws.span(run), stream);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    const std::vector<float> w = d_weights.download();
    EXPECT_TRUE(ExactlyEqual(d_ids.download(), ids)) << "run " << run;
    EXPECT_TRUE(moe::testing::all_close(w, weights, kSelectTolerance)) << "run " << run;
    if (run == 0) first_weights = w;
    else EXPECT_TRUE(BitwiseEqual(w, first_weights)) << "weights differ between runs";
  }
}

TEST_F(CudaOps, SelectExpertsSoftmaxMatchesCpu) {
  using P = moe::routing::SoftmaxTopK;
  const std::pair<Index, int> shapes[] = {{1, 1}, {8, 2}, {64, 8}, {512, 16}};
  std::uint64_t seed = 100;
  for (Index M : {0, 1, 7, 64, 1000}) {
    for (const auto& [E, k] : shapes) {
      for (bool renormalize : {false, true}) {
        check_select<P>(stream_, M, E, k, {renormalize, 1.0f}, false, M == 7 ? 5 : 0, seed++);
        if (HasFailure()) return;
      }
    }
  }
  check_select<P>(stream_, 65536, 8, 2, {true, 1.0f}, false, 0, seed++);
  check_select<P>(stream_, 65536, 64, 8, {false, 1.0f}, false, 3, seed++);
}

TEST_F(CudaOps, SelectExpertsSigmoidWithCorrectionBiasMatchesCpu) {
  using P = moe::routing::SigmoidTopK;
  std::uint64_t seed = 200;
  for (Index M : {0, 1, 7, 64, 1000}) {
    const std::pair<Index, int> shapes[] = {{16, 4}, {128, 8}, {512, 16}};
    for (const auto& [E, k] : shapes) {
      check_select<P>(stream_, M, E, k, {true, 2.5f}, true, M == 64 ? 2 : 0, seed++);
      check_select<P>(stream_, M, E, k, {false, 1.0f}, false, 0, seed++);
      if (HasFailure()) return;
    }
  }
}

TEST_F(CudaOps, SelectExpertsGroupedSigmoidMatchesCpu) {
  using P = moe::routing::GroupedTopK<moe::routing::Sigmoid>;
  std::uint64_t seed = 300;
  for (Index M : {1, 7, 64, 1000}) {
    check_select<P>(stream_, M, 64, 8, {8, 4, true, 2.5f}, true, 0, seed++);       // DeepSeek-V3-like
    check_select<P>(stream_, M, 256, 8, {8, 4, true, 2.5f}, true, 1, seed++);
    check_select<P>(stream_, M, 32, 4, {4, 2, false, 1.0f}, false, 0, seed++);     // group key = max
    check_select<P>(stream_, M, 512, 16, {16, 16, true, 1.0f}, true, 0, seed++);  // every group kept
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, SelectExpertsLlama4MatchesCpu) {
  std::uint64_t seed = 400;
  for (Index M : {0, 1, 7, 64, 1000, 65536}) {
    check_select<moe::routing::Llama4TopK>(stream_, M, 16, 1, {}, false, 0, seed++);
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, SelectExpertsRejectsBadInputs) {
  using Softmax = moe::routing::SoftmaxTopK;
  using Llama4 = moe::routing::Llama4TopK;
  using Grouped = moe::routing::GroupedTopK<moe::routing::Sigmoid>;
  const Index M = 4, E = 8;
  const int k = 2;
  Random rng(7);
  const std::vector<float> logits = rng.gapped_logits(M, E);
  const std::vector<float> bias(E, 0.1f);
  std::vector<i32> h_ids(64);
  std::vector<float> h_w(64);
  DeviceBuffer<float> d_logits(logits), d_bias(bias), d_w = dbuf<float>(64);
  DeviceBuffer<i32> d_ids = dbuf<i32>(64);
  Workspace ws(moe::cuda::select_experts_workspace_bytes(M, E));
  d_ids.fill_bytes(kUntouched);
  d_w.fill_bytes(kUntouched);
  device_sync();
  auto rejected = [&](const Status& gpu, const Status& cpu, std::string_view name) {
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_ids));
    EXPECT_TRUE(Untouched(d_w));
  };
  {  // top_k > E
    const int bad = E + 1;
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), bad, {}, std::nullopt, dout(d_ids, M, bad),
                                                dout(d_w, M, bad), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), bad, {}, std::nullopt, hout(h_ids, M, bad),
                                               hout(h_w, M, bad)),
             "top_k");
  }
  {  // topk_ids with the wrong number of rows
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, std::nullopt, dout(d_ids, M - 1, k),
                                                dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), k, {}, std::nullopt, hout(h_ids, M - 1, k),
                                               hout(h_w, M, k)),
             "topk_ids");
  }
  {  // topk_weights with the wrong number of columns
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, std::nullopt, dout(d_ids, M, k),
                                                dout(d_w, M, k + 1), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), k, {}, std::nullopt, hout(h_ids, M, k),
                                               hout(h_w, M, k + 1)),
             "topk_weights");
  }
  {  // a correction bias for a policy that has none
    rejected(moe::cuda::select_experts<Llama4>(din(d_logits, M, E), 1, {}, din1(d_bias), dout(d_ids, M, 1),
                                               dout(d_w, M, 1), ws.span(0), stream_),
             moe::cpu::select_experts<Llama4>(hin(logits, M, E), 1, {}, hin1(bias), hout(h_ids, M, 1), hout(h_w, M, 1)),
             "correction_bias");
  }
  {  // correction bias of the wrong length
    rejected(moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, din1(d_bias, E - 1), dout(d_ids, M, k),
                                                dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(hin(logits, M, E), k, {}, hin1(bias, E - 1), hout(h_ids, M, k),
                                               hout(h_w, M, k)),
             "correction_bias");
  }
  {  // a group count that does not divide E
    const Grouped::Arguments a{3, 1, false, 1.0f};
    rejected(moe::cuda::select_experts<Grouped>(din(d_logits, M, E), k, a, std::nullopt, dout(d_ids, M, k),
                                                dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Grouped>(hin(logits, M, E), k, a, std::nullopt, hout(h_ids, M, k), hout(h_w, M, k)),
             "routing.num_expert_group");
  }
  {  // null logits
    rejected(moe::cuda::select_experts<Softmax>(DeviceView<const float, 2>(nullptr, {M, E}), k, {}, std::nullopt,
                                                dout(d_ids, M, k), dout(d_w, M, k), ws.span(0), stream_),
             moe::cpu::select_experts<Softmax>(HostView<const float, 2>(nullptr, {M, E}), k, {}, std::nullopt,
                                               hout(h_ids, M, k), hout(h_w, M, k)),
             "router_logits");
  }
  {  // workspace one byte short
    const Status s = moe::cuda::select_experts<Softmax>(din(d_logits, M, E), k, {}, std::nullopt, dout(d_ids, M, k),
                                                        dout(d_w, M, k), ws.span(0).first(ws.need - 1), stream_);
    EXPECT_EQ(s.code(), StatusCode::kWorkspaceTooSmall) << s.to_string();
    EXPECT_NE(s.message().find("workspace"), std::string::npos) << s.message();
    EXPECT_TRUE(Untouched(d_ids));
    EXPECT_TRUE(Untouched(d_w));
  }
}

// ---------------------------------------------------------------------------------------------
// moe_permute

struct PermuteCase {
  Index M;
  int k;
  Index E;
  int ep_size;
  int ep_rank;
  moe::ExpertPlacement placement;
  Index A;
  bool invalid_ids;
  bool scales;
  bool m_indices;
  i32 fill;
  Index H;
  Index pad;
  bool checked;
};

std::string describe(const PermuteCase& c) {
  std::ostringstream os;
  os << "M=" << c.M << " k=" << c.k << " E=" << c.E << " ep=" << c.ep_size << "/" << c.ep_rank
     << (c.placement == moe::ExpertPlacement::kLinear ? " linear" : " round_robin") << " A=" << c.A
     << " invalid=" << c.invalid_ids << " scales=" << c.scales << " m_indices=" << c.m_indices << " fill=" << c.fill
     << " H=" << c.H << " pad=" << c.pad << " checked=" << c.checked;
  return os.str();
}

std::vector<PermuteCase> permute_cases() {
  std::vector<PermuteCase> cases;
  const Index Es[] = {8, 64, 512, 13};
  const int ks[] = {1, 2, 8, 16};
  int i = 0;
  for (Index M : kTokenCounts) {
    for (const Ep& ep : kEps) {
      for (Index A : {0, 16, 128}) {
        const bool big = M >= 65536;
        PermuteCase c{};
        c.M = M;
        c.E = big ? 256 : Es[i % 4];
        c.k = big ? 4 : ks[(i / 4) % 4];
        c.ep_size = ep.size;
        c.ep_rank = i % ep.size;
        c.placement = ep.placement;
        c.A = A;
        c.invalid_ids = i % 2 == 0;
        c.scales = (i / 2) % 2 == 0;
        c.m_indices = i % 3 != 0;
        c.fill = i % 2 ? -1 : 7;
        c.H = M >= 1000 ? 8 : 40;
        c.pad = i % 4 == 1 ? 3 : 0;
        c.checked = i % 5 == 0;
        cases.push_back(c);
        ++i;
      }
    }
  }
  // A single expert; every slot on one expert.
  cases.push_back({64, 2, 1, 1, 0, moe::ExpertPlacement::kLinear, 0, true, true, true, -1, 16, 0, true});
  cases.push_back({64, 2, 1, 1, 0, moe::ExpertPlacement::kLinear, 16, false, true, true, 3, 16, 0, false});
  return cases;
}

template <class T>
void check_permute(cudaStream_t stream, const PermuteCase& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  Random rng(seed);
  const Index M = c.M, k = c.k, H = c.H, ld = c.H + c.pad, S = 3;
  const MapSetup ms = ep_map(c.ep_size, c.ep_rank, c.E, c.placement);
  const Index El = ms.num_local;
  const Index R = moe::cpu::moe_permute_rows(M, c.k, El, c.A);
  ASSERT_EQ(R, moe::cuda::moe_permute_rows(M, c.k, El, c.A));
  const std::vector<T> hidden = rng.normal_vector<T>(static_cast<std::size_t>(M * ld));
  const std::vector<float> scales = rng.uniform_vector<float>(static_cast<std::size_t>(M * S), 0.5f, 2.0f);
  std::vector<i32> ids = random_ids(rng, M, k, c.E, c.invalid_ids);
  if (c.E == 1 && !ids.empty()) ids[0] = 0;

  // CPU reference.
  std::vector<T> ph(static_cast<std::size_t>(R * H));
  std::vector<float> psc(static_cast<std::size_t>(R * S));
  std::vector<i64> eft(static_cast<std::size_t>(El + 1));
  std::vector<i32> inv(static_cast<std::size_t>(M * k)), pidx(static_cast<std::size_t>(R)), midx(static_cast<std::size_t>(R));
  moe::cpu::PermuteOutputs<T> h_out{hout(ph, R, H), std::nullopt, hout1(eft), hout1(inv), hout1(pidx), std::nullopt};
  if (c.m_indices) h_out.m_indices = hout1(midx);
  std::optional<HostView<const float, 2>> h_scales;
  if (c.scales) {
    h_scales = hin(scales, M, S);
    h_out.permuted_scales = hout(psc, R, S);
  }
  std::optional<HostView<const i32, 1>> h_map;
  if (ms.has_map) h_map = hin1(ms.map);
  const Status cpu = moe::cpu::moe_permute<T>(hin(hidden, M, H, ld), h_scales, hin(ids, M, k), c.E, El, h_map, c.A,
                                              c.fill, h_out);
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  // CUDA.
  DeviceBuffer<T> d_hidden(hidden), d_ph = dbuf<T>(R * H);
  DeviceBuffer<float> d_scales(scales), d_psc = dbuf<float>(R * S);
  DeviceBuffer<i32> d_ids(ids), d_map(ms.map), d_inv = dbuf<i32>(M * k), d_pidx = dbuf<i32>(R), d_midx = dbuf<i32>(R);
  DeviceBuffer<i64> d_eft = dbuf<i64>(El + 1);
  moe::cuda::PermuteOutputs<T> d_out{dout(d_ph, R, H), std::nullopt, dout1(d_eft), dout1(d_inv), dout1(d_pidx), std::nullopt};
  if (c.m_indices) d_out.m_indices = dout1(d_midx);
  moe::cuda::OptDeviceView<const float, 2> dv_scales;
  if (c.scales) {
    dv_scales = din(d_scales, M, S);
    d_out.permuted_scales = dout(d_psc, R, S);
  }
  moe::cuda::OptDeviceView<const i32, 1> dv_map;
  if (ms.has_map) dv_map = din1(d_map);
  Workspace ws(moe::cuda::moe_permute_workspace_bytes(M, c.k, c.E, El, c.A));
  for (int run = 0; run < 2; ++run) {
    ws.poison(run);
    d_ph.fill_bytes(kOutputPoison[run]);
    d_psc.fill_bytes(kOutputPoison[run]);
    d_inv.fill_bytes(kOutputPoison[run]);
    d_pidx.fill_bytes(kOutputPoison[run]);
    d_midx.fill_bytes(kOutputPoison[run]);
    d_eft.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_permute<T>(din(d_hidden, M, H, ld), dv_scales, din(d_ids, M, k), c.E, El, dv_map,
                                               c.A, c.fill, d_out, ws.span(run), stream, c.checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(ExactlyEqual(d_eft.download(), eft)) << "expert_first_token_offset, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_inv.download(), inv)) << "inv_permuted_idx, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_pidx.download(), pidx)) << "permuted_idx, run " << run;
    if (c.m_indices) EXPECT_TRUE(ExactlyEqual(d_midx.download(), midx)) << "m_indices, run " << run;
    EXPECT_TRUE(BitwiseEqual(d_ph.download(), ph)) << "permuted_hidden_states, run " << run;
    if (c.scales) EXPECT_TRUE(BitwiseEqual(d_psc.download(), psc)) << "permuted_scales, run " << run;
  }
}

TEST_F(CudaOps, PermuteMatchesCpuBf16) {
  std::uint64_t seed = 1000;
  for (const PermuteCase& c : permute_cases()) {
    check_permute<bfloat16>(stream_, c, seed++);
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, PermuteMatchesCpuF32) {
  std::uint64_t seed = 2000;
  for (const PermuteCase& c : permute_cases()) {
    check_permute<float>(stream_, c, seed++);
    if (HasFailure()) return;
  }
}

TEST_F(CudaOps, PermuteRejectsBadInputs) {
  const Index M = 16, k = 2, E = 8, H = 8, S = 2, kBig = 4096;
  Random rng(11);
  const std::vector<float> hidden = rng.normal_vector<float>(M * H), scales = rng.normal_vector<float>(M * S);
  const std::vector<i32> ids = random_ids(rng, M, k, E, false);
  std::vector<float> h_ph(kBig * H), h_psc(kBig * S);
  std::vector<i64> h_eft(kBig);
  std::vector<i32> h_inv(kBig), h_pidx(kBig), h_midx(kBig);
  DeviceBuffer<float> d_hidden(hidden), d_scales(scales), d_ph = dbuf<float>(kBig * H), d_psc = dbuf<float>(kBig * S);
  DeviceBuffer<i64> d_eft = dbuf<i64>(kBig);
  DeviceBuffer<i32> d_ids(ids), d_map = dbuf<i32>(E), d_inv = dbuf<i32>(kBig), d_pidx = dbuf<i32>(kBig),
                    d_midx = dbuf<i32>(kBig);
  for (auto* b : {&d_inv, &d_pidx, &d_midx}) b->fill_bytes(kUntouched);
  d_ph.fill_bytes(kUntouched);
  d_psc.fill_bytes(kUntouched);
  d_eft.fill_bytes(kUntouched);
  device_sync();

  struct Cfg {
    Index El = 8;
    std::optional<std::vector<i32>> map;
    Index A = 0;
    Index ids_cols = 2;
    Index ph_rows = -1;   // -1: the right R
    Index eft_n = -1;     // -1: El + 1
    bool scales = false;
    bool permuted_scales = false;
    bool checked = true;
  };
  // Runs both ops; returns {CUDA, CPU}.
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    const Index R = moe::cpu::moe_permute_rows(M, static_cast<int>(k), c.El, c.A);
    const Index rows = c.ph_rows >= 0 ? c.ph_rows : R, eft_n = c.eft_n >= 0 ? c.eft_n : c.El + 1;
    Workspace ws(moe::cuda::moe_permute_workspace_bytes(M, static_cast<int>(k), E, c.El, std::max<Index>(c.A, 0)));
    moe::cpu::PermuteOutputs<float> h_out{hout(h_ph, rows, H), std::nullopt, hout1(h_eft, eft_n), hout1(h_inv, M * k),
                                          hout1(h_pidx, R), hout1(h_midx, R)};
    moe::cuda::PermuteOutputs<float> d_out{dout(d_ph, rows, H), std::nullopt, dout1(d_eft, eft_n), dout1(d_inv, M * k),
                                           dout1(d_pidx, R), dout1(d_midx, R)};
    std::optional<HostView<const float, 2>> h_scales;
    moe::cuda::OptDeviceView<const float, 2> dv_scales;
    if (c.scales) {
      h_scales = hin(scales, M, S);
      dv_scales = din(d_scales, M, S);
    }
    if (c.permuted_scales) {
      h_out.permuted_scales = hout(h_psc, R, S);
      d_out.permuted_scales = dout(d_psc, R, S);
    }
    std::optional<HostView<const i32, 1>> h_map;
    moe::cuda::OptDeviceView<const i32, 1> dv_map;
    if (c.map) {
      d_map.upload(*c.map);
      device_sync();
      h_map = hin1(*c.map);
      dv_map = din1(d_map);
    }
    const Status gpu = moe::cuda::moe_permute<float>(din(d_hidden, M, H), dv_scales, din(d_ids, M, c.ids_cols), E,
                                                     c.El, dv_map, c.A, -1, d_out, ws.span(0), stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_permute<float>(hin(hidden, M, H), h_scales, hin(ids, M, c.ids_cols), E, c.El,
                                                    h_map, c.A, -1, h_out);
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_ph));
    EXPECT_TRUE(Untouched(d_psc));
    EXPECT_TRUE(Untouched(d_eft));
    EXPECT_TRUE(Untouched(d_inv));
    EXPECT_TRUE(Untouched(d_pidx));
    EXPECT_TRUE(Untouched(d_midx));
  };
  const std::vector<i32> duplicate = {0, 1, 2, 3, 0, -1, -1, -1};      // local 0 owned twice
  const std::vector<i32> out_of_range = {0, 1, 2, 3, 4, -1, -1, -1};   // 4 >= E_local
  {
    Cfg c;
    c.ph_rows = M * k + 1;
    rejected(c, "permuted_hidden_states");
  }
  {
    Cfg c;
    c.El = 4;
    rejected(c, "expert_map");  // required when E_local != E
  }
  {
    Cfg c;
    c.A = -1;
    rejected(c, "align_block_size");
  }
  {
    Cfg c;
    c.ids_cols = 0;
    rejected(c, "topk_ids");
  }
  {
    Cfg c;
    c.eft_n = 8;
    rejected(c, "expert_first_token_offset");
  }
  {
    Cfg c;
    c.scales = true;
    rejected(c, "permuted_scales");
  }
  for (const auto* bad_map : {&duplicate, &out_of_range}) {
    Cfg c;
    c.El = 4;
    c.map = *bad_map;
    c.A = 16;
    rejected(c, "expert_map");  // checked: contents validated on a host copy
    // Unchecked, the op runs (memory-safe: run under compute-sanitizer to see it) and returns ok.
    c.checked = false;
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(gpu.is_ok()) << gpu.to_string();
    device_sync();
    for (auto* b : {&d_inv, &d_pidx, &d_midx}) b->fill_bytes(kUntouched);
    d_ph.fill_bytes(kUntouched);
    d_psc.fill_bytes(kUntouched);
    d_eft.fill_bytes(kUntouched);
    device_sync();
  }
}

// ---------------------------------------------------------------------------------------------
// moe_unpermute

template <class T>
void check_unpermute(cudaStream_t stream, Index M, Index k, Index R, Index H, bool with_eft, Index pad, bool checked,
                     std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " R=" << R << " H=" << H << " eft=" << with_eft
                                    << " pad=" << pad << " checked=" << checked);
  Random rng(seed);
  const Index ld = H + pad, El = 5;
  const std::vector<T> permuted = rng.normal_vector<T>(static_cast<std::size_t>(R * ld));
  const std::vector<float> weights = rng.uniform_vector<float>(static_cast<std::size_t>(M * k), -1.0f, 1.0f);
  const Index valid = with_eft ? rng.integer(0, static_cast<int>(R)) : R;
  std::vector<i64> eft(static_cast<std::size_t>(El + 1));
  for (Index e = 0; e <= El; ++e) eft[e] = valid * e / El;
  std::vector<i32> inv(static_cast<std::size_t>(M * k));
  for (auto& r : inv) {
    if (with_eft && (valid == 0 || rng.integer(0, 3) == 0)) {  // skipped: rows >= the last offset
      const i32 skip[] = {static_cast<i32>(valid), static_cast<i32>(R), static_cast<i32>(R + 7), kI32Max};
      r = skip[rng.integer(0, 3)];
    } else {
      r = rng.integer(0, static_cast<int>(valid - 1));
    }
  }
  std::vector<T> out(static_cast<std::size_t>(M * H));
  std::optional<HostView<const i64, 1>> h_eft;
  if (with_eft) h_eft = hin1(eft);
  const Status cpu = moe::cpu::moe_unpermute<T>(hin(permuted, R, H, ld), hin(weights, M, k), hin1(inv), h_eft,
                                                hout(out, M, H));
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<T> d_permuted(permuted), d_out = dbuf<T>(M * H);
  DeviceBuffer<float> d_weights(weights);
  DeviceBuffer<i32> d_inv(inv);
  DeviceBuffer<i64> d_eft(eft);
  moe::cuda::OptDeviceView<const i64, 1> dv_eft;
  if (with_eft) dv_eft = din1(d_eft);
  for (int run = 0; run < 2; ++run) {
    d_out.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_unpermute<T>(din(d_permuted, R, H, ld), din(d_weights, M, k), din1(d_inv), dv_eft,
                                                 dout(d_out, M, H), stream, checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(BitwiseEqual(d_out.download(), out)) << "run " << run;
  }
}

template <class T>
void unpermute_grid(cudaStream_t stream, std::uint64_t seed) {
  int i = 0;
  const Index ks[] = {1, 2, 8, 16};
  for (Index M : kTokenCounts) {
    for (bool with_eft : {false, true}) {
      const Index k = M >= 65536 ? 2 : ks[i % 4];
      const Index R = M * k + (i % 2 ? 37 : 1);
      const Index H = M >= 1000 ? 16 : 72;
      check_unpermute<T>(stream, M, k, R, H, with_eft, i % 3 == 1 ? 5 : 0, i % 4 == 0, seed++);
      if (::testing::Test::HasFailure()) return;
      ++i;
    }
  }
}

TEST_F(CudaOps, UnpermuteMatchesCpuBitwise) {
  unpermute_grid<bfloat16>(stream_, 3000);
  unpermute_grid<half>(stream_, 3100);
  unpermute_grid<float>(stream_, 3200);
}

// Round trip through the permute outputs (vLLM's use), aligned, with an expert map.
TEST_F(CudaOps, UnpermuteAfterPermuteMatchesCpu) {
  const Index M = 300, k = 4, E = 32, H = 24, A = 16;
  Random rng(3300);
  const MapSetup ms = ep_map(4, 2, E, moe::ExpertPlacement::kRoundRobin);
  const Index El = ms.num_local, R = moe::cpu::moe_permute_rows(M, k, El, A);
  const std::vector<bfloat16> hidden = rng.normal_vector<bfloat16>(M * H);
  const std::vector<i32> ids = random_ids(rng, M, k, E, true);
  const std::vector<float> weights = rng.uniform_vector<float>(M * k, 0.0f, 1.0f);
  std::vector<bfloat16> ph(R * H), out(M * H);
  std::vector<i64> eft(El + 1);
  std::vector<i32> inv(M * k), pidx(R);
  ASSERT_TRUE(moe::cpu::moe_permute<bfloat16>(hin(hidden, M, H), std::nullopt, hin(ids, M, k), E, El, hin1(ms.map), A,
                                              -1, {hout(ph, R, H), std::nullopt, hout1(eft), hout1(inv), hout1(pidx), std::nullopt})
                  .is_ok());
  ASSERT_TRUE(moe::cpu::moe_unpermute<bfloat16>(hin(ph, R, H), hin(weights, M, k), hin1(inv), hin1(eft), hout(out, M, H)).is_ok());

  DeviceBuffer<bfloat16> d_hidden(hidden), d_ph = dbuf<bfloat16>(R * H), d_out = dbuf<bfloat16>(M * H);
  DeviceBuffer<i32> d_ids(ids), d_map(ms.map), d_inv = dbuf<i32>(M * k), d_pidx = dbuf<i32>(R);
  DeviceBuffer<i64> d_eft = dbuf<i64>(El + 1);
  DeviceBuffer<float> d_weights(weights);
  d_out.fill_bytes(0xFF);
  Workspace ws(moe::cuda::moe_permute_workspace_bytes(M, k, E, El, A));
  ws.poison(0);
  device_sync();
  ASSERT_TRUE(moe::cuda::moe_permute<bfloat16>(din(d_hidden, M, H), std::nullopt, din(d_ids, M, k), E, El, din1(d_map), A, -1,
                                               {dout(d_ph, R, H), std::nullopt, dout1(d_eft), dout1(d_inv), dout1(d_pidx), std::nullopt},
                                               ws.span(0), stream_)
                  .is_ok());
  ASSERT_TRUE(moe::cuda::moe_unpermute<bfloat16>(din(d_ph, R, H), din(d_weights, M, k), din1(d_inv), din1(d_eft),
                                                 dout(d_out, M, H), stream_)
                  .is_ok());
  stream_sync(stream_);
  EXPECT_TRUE(BitwiseEqual(d_out.download(), out));
}

TEST_F(CudaOps, UnpermuteRejectsBadInputs) {
  const Index M = 8, k = 2, R = 20, H = 8, kBig = 1024;
  Random rng(13);
  const std::vector<float> permuted = rng.normal_vector<float>(R * H), weights = rng.normal_vector<float>(M * k);
  std::vector<i32> inv(M * k);
  for (auto& r : inv) r = rng.integer(0, static_cast<int>(R - 1));
  const std::vector<i64> eft = {0, 10, R};
  std::vector<float> h_out(kBig);
  DeviceBuffer<float> d_permuted(permuted), d_weights(weights), d_out = dbuf<float>(kBig);
  DeviceBuffer<i32> d_inv(inv);
  DeviceBuffer<i64> d_eft(eft);
  d_out.fill_bytes(kUntouched);
  device_sync();

  struct Cfg {
    std::vector<i32> inv;
    std::optional<std::vector<i64>> eft;
    Index inv_n = -1;
    Index out_cols = -1;
    bool checked = true;
  };
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    d_inv.upload(c.inv);
    std::optional<HostView<const i64, 1>> h_eft;
    moe::cuda::OptDeviceView<const i64, 1> dv_eft;
    if (c.eft) {
      if (!c.eft->empty()) d_eft.upload(*c.eft);
      h_eft = hin1(*c.eft);
      dv_eft = din1(d_eft, static_cast<Index>(c.eft->size()));
    }
    device_sync();
    const Index inv_n = c.inv_n >= 0 ? c.inv_n : M * k, cols = c.out_cols >= 0 ? c.out_cols : H;
    const Status gpu = moe::cuda::moe_unpermute<float>(din(d_permuted, R, H), din(d_weights, M, k), din1(d_inv, inv_n),
                                                       dv_eft, dout(d_out, M, cols), stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_unpermute<float>(hin(permuted, R, H), hin(weights, M, k), hin1(c.inv, inv_n), h_eft,
                                                      hout(h_out, M, cols));
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_out));
  };
  {
    Cfg c{inv};
    c.out_cols = H + 1;
    rejected(c, "output");
  }
  {
    Cfg c{inv};
    c.inv_n = M * k - 1;
    rejected(c, "inv_permuted_idx");
  }
  {
    Cfg c{inv};
    c.eft = std::vector<i64>{};
    rejected(c, "expert_first_token_offset");
  }
  // Data-dependent (checked mode): a row outside [0, R), a negative row, a last offset > R.
  std::vector<i32> bad_row = inv, negative = inv;
  bad_row[5] = static_cast<i32>(R);
  negative[3] = -1;
  const std::vector<i64> bad_eft = {0, 10, R + 1};
  {
    Cfg c{bad_row};
    rejected(c, "inv_permuted_idx");
  }
  {
    Cfg c{negative};
    c.eft = eft;
    rejected(c, "inv_permuted_idx");
  }
  {
    Cfg c{inv};
    c.eft = bad_eft;
    rejected(c, "expert_first_token_offset");
  }
  // Unchecked, the same inputs run (out-of-range rows contribute zero, never addressed).
  for (Cfg c : {Cfg{bad_row}, Cfg{negative, eft}, Cfg{bad_row, bad_eft}}) {
    c.checked = false;
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(gpu.is_ok()) << gpu.to_string();
  }
  device_sync();
}

}  // namespace
