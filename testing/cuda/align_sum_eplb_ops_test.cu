// moe_align_block_size, moe_fused_mul_sum and eplb_logical_to_physical on the device against the CPU ops.
#include "testing/cuda/ops_test_support.cuh"

namespace {

// ---------------------------------------------------------------------------------------------
// moe_align_block_size

struct AlignCase {
  Index M, k, E, B;
  bool pad_sorted, ignore_invalid;
  int ep_size, ep_rank;
  moe::ExpertPlacement placement;
  bool invalid_ids, checked;
};

std::string describe(const AlignCase& c) {
  std::ostringstream os;
  os << "M=" << c.M << " k=" << c.k << " E=" << c.E << " B=" << c.B << " pad_sorted_ids=" << c.pad_sorted
     << " ignore_invalid_experts=" << c.ignore_invalid << " ep=" << c.ep_size << "/" << c.ep_rank
     << (c.placement == moe::ExpertPlacement::kLinear ? " linear" : " round_robin") << " invalid=" << c.invalid_ids
     << " checked=" << c.checked;
  return os.str();
}

void check_align(cudaStream_t stream, const AlignCase& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  Random rng(seed);
  const MapSetup ms = ep_map(c.ep_size, c.ep_rank, c.E, c.placement);
  const std::vector<i32> ids = random_ids(rng, c.M, c.k, c.E, c.invalid_ids);
  const Index numel = c.M * c.k;
  const auto sz = moe::cpu::moe_align_block_size_sizes(numel, c.E, c.B, c.pad_sorted);
  const auto dsz = moe::cuda::moe_align_block_size_sizes(numel, c.E, c.B, c.pad_sorted);
  ASSERT_EQ(sz.max_num_tokens_padded, dsz.max_num_tokens_padded);
  ASSERT_EQ(sz.num_blocks, dsz.num_blocks);
  std::vector<i32> sorted(static_cast<std::size_t>(sz.max_num_tokens_padded)), expert_ids(static_cast<std::size_t>(sz.num_blocks)),
      total(1);
  std::optional<HostView<const i32, 1>> h_map;
  if (ms.has_map) h_map = hin1(ms.map);
  const Status cpu = moe::cpu::moe_align_block_size(hin(ids, c.M, c.k), c.B, c.E, h_map, c.pad_sorted, c.ignore_invalid,
                                                    hout1(sorted), hout1(expert_ids), hout1(total));
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<i32> d_ids(ids), d_map(ms.map), d_sorted = dbuf<i32>(sz.max_num_tokens_padded),
                                d_expert_ids = dbuf<i32>(sz.num_blocks), d_total = dbuf<i32>(1);
  moe::cuda::OptDeviceView<const i32, 1> dv_map;
  if (ms.has_map) dv_map = din1(d_map);
  Workspace ws(moe::cuda::moe_align_block_size_workspace_bytes(c.M, c.k, c.E));
  for (int run = 0; run < 2; ++run) {
    ws.poison(run);
    d_sorted.fill_bytes(kOutputPoison[run]);
    d_expert_ids.fill_bytes(kOutputPoison[run]);
    d_total.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_align_block_size(din(d_ids, c.M, c.k), c.B, c.E, dv_map, c.pad_sorted,
                                                     c.ignore_invalid, dout1(d_sorted), dout1(d_expert_ids),
                                                     dout1(d_total), ws.span(run), stream, c.checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(ExactlyEqual(d_sorted.download(), sorted)) << "sorted_token_ids, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_expert_ids.download(), expert_ids)) << "expert_ids, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_total.download(), total)) << "num_tokens_post_padded, run " << run;
  }
}

TEST_F(CudaOps, AlignBlockSizeMatchesCpu) {
  const Index Es[] = {8, 64, 512, 256};
  const Index ks[] = {1, 2, 8, 16};
  std::uint64_t seed = 4000;
  int i = 0;
  for (Index M : kTokenCounts) {
    for (Index B : {1, 16, 128}) {
      for (bool pad_sorted : {false, true}) {
        for (bool ignore_invalid : {false, true}) {
          const Ep& ep = kEps[i % 3];
          AlignCase c{M, M >= 65536 ? 4 : ks[(i / 3) % 4], Es[i % 4], B, pad_sorted, ignore_invalid,
                      ep.size, (i / 2) % ep.size, ep.placement, i % 2 == 0, i % 5 == 0};
          check_align(stream_, c, seed++);
          if (HasFailure()) return;
          ++i;
        }
      }
    }
  }
  // One expert; all slots on one expert of many.
  check_align(stream_, {100, 2, 1, 16, false, false, 1, 0, moe::ExpertPlacement::kLinear, false, true}, seed++);
}

TEST_F(CudaOps, AlignBlockSizeRejectsBadInputs) {
  const Index M = 16, k = 2, E = 8, B = 16, kBig = 4096;
  Random rng(17);
  const std::vector<i32> ids = random_ids(rng, M, k, E, true);
  const auto sz = moe::cpu::moe_align_block_size_sizes(M * k, E, B, false);
  std::vector<i32> h_sorted(kBig), h_eids(kBig), h_total(4);
  DeviceBuffer<i32> d_ids(ids), d_map = dbuf<i32>(E), d_sorted = dbuf<i32>(kBig), d_eids = dbuf<i32>(kBig),
                    d_total = dbuf<i32>(4);
  d_sorted.fill_bytes(kUntouched);
  d_eids.fill_bytes(kUntouched);
  d_total.fill_bytes(kUntouched);
  device_sync();
  struct Cfg {
    Index B = 16, E = 8;
    std::optional<std::vector<i32>> map;
    Index map_n = -1;
    Index sorted_n = -1, eids_n = -1, total_n = 1;
    bool ignore_invalid = false;
    bool checked = true;
  };
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    const Index sorted_n = c.sorted_n >= 0 ? c.sorted_n : sz.max_num_tokens_padded;
    const Index eids_n = c.eids_n >= 0 ? c.eids_n : sz.num_blocks;
    std::optional<HostView<const i32, 1>> h_map;
    moe::cuda::OptDeviceView<const i32, 1> dv_map;
    if (c.map) {
      d_map.upload(*c.map);
      device_sync();
      const Index n = c.map_n >= 0 ? c.map_n : static_cast<Index>(c.map->size());
      h_map = hin1(*c.map, n);
      dv_map = din1(d_map, n);
    }
    Workspace ws(moe::cuda::moe_align_block_size_workspace_bytes(M, k, std::max<Index>(c.E, 1)));
    const Status gpu = moe::cuda::moe_align_block_size(din(d_ids, M, k), c.B, c.E, dv_map, false, c.ignore_invalid,
                                                       dout1(d_sorted, sorted_n), dout1(d_eids, eids_n),
                                                       dout1(d_total, c.total_n), ws.span(0), stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_align_block_size(hin(ids, M, k), c.B, c.E, h_map, false, c.ignore_invalid,
                                                      hout1(h_sorted, sorted_n), hout1(h_eids, eids_n),
                                                      hout1(h_total, c.total_n));
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_sorted));
    EXPECT_TRUE(Untouched(d_eids));
    EXPECT_TRUE(Untouched(d_total));
  };
  {
    Cfg c;
    c.B = 0;
    rejected(c, "block_size");
  }
  {
    Cfg c;
    c.E = 0;
    rejected(c, "num_experts");
  }
  {
    Cfg c;
    c.sorted_n = sz.max_num_tokens_padded + 1;
    rejected(c, "sorted_token_ids");
  }
  {
    Cfg c;
    c.eids_n = sz.num_blocks - 1;
    rejected(c, "expert_ids");
  }
  {
    Cfg c;
    c.total_n = 2;
    rejected(c, "num_tokens_post_padded");
  }
  {
    Cfg c;
    c.map = std::vector<i32>{0, 1, 2, 3, -1, -1, -1, -1};
    c.map_n = E - 1;
    rejected(c, "expert_map");
  }
  const std::vector<i32> too_large = {0, 1, 2, 3, 8, -1, -1, -1};  // 8 >= E
  const std::vector<i32> duplicate = {0, 1, 2, 3, 3, -1, -1, -1};
  for (const auto* bad : {&too_large, &duplicate}) {
    for (bool ignore_invalid : {false, true}) {
      Cfg c;
      c.map = *bad;
      c.ignore_invalid = ignore_invalid;
      rejected(c, "expert_map");
      c.checked = false;  // unchecked: runs, memory-safe
      const auto [gpu, cpu] = run(c);
      EXPECT_TRUE(gpu.is_ok()) << gpu.to_string();
      d_sorted.fill_bytes(kUntouched);
      d_eids.fill_bytes(kUntouched);
      d_total.fill_bytes(kUntouched);
      device_sync();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// moe_fused_mul_sum

enum class MulSumMap { kNone, kNoneWithIds, kEp, kArbitrary };

template <class T>
void check_fused(cudaStream_t stream, Index M, Index k, Index H, MulSumMap map_kind, Index slot_pad, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "M=" << M << " k=" << k << " H=" << H << " map=" << static_cast<int>(map_kind)
                                    << " slot_pad=" << slot_pad);
  Random rng(seed);
  const Index E = 32, ld_slot = H + slot_pad, ld_token = k * ld_slot;
  const std::vector<T> inputs = rng.normal_vector<T>(static_cast<std::size_t>(M * ld_token));
  const std::vector<float> weights = rng.uniform_vector<float>(static_cast<std::size_t>(M * k), -1.0f, 1.0f);
  const std::vector<i32> ids = random_ids(rng, M, k, E, true);
  std::vector<i32> map;
  if (map_kind == MulSumMap::kEp) map = ep_map(4, 1, E, moe::ExpertPlacement::kRoundRobin).map;
  if (map_kind == MulSumMap::kArbitrary) {  // not validated by the op: only the sign matters
    map.resize(E);
    for (auto& x : map) x = rng.integer(-3, 40);
  }
  const bool with_ids = map_kind != MulSumMap::kNone, with_map = !map.empty();
  std::vector<T> out(static_cast<std::size_t>(M * H));
  std::optional<HostView<const i32, 2>> h_ids;
  std::optional<HostView<const i32, 1>> h_map;
  if (with_ids) h_ids = hin(ids, M, k);
  if (with_map) h_map = hin1(map);
  const HostView<const T, 3> h_inputs(inputs.data(), {M, k, H}, {ld_token, ld_slot, 1});
  const Status cpu = moe::cpu::moe_fused_mul_sum<T>(h_inputs, hin(weights, M, k), hout(out, M, H), h_ids, h_map);
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<T> d_inputs(inputs), d_out = dbuf<T>(M * H);
  DeviceBuffer<float> d_weights(weights);
  DeviceBuffer<i32> d_ids(ids), d_map(map);
  moe::cuda::OptDeviceView<const i32, 2> dv_ids;
  moe::cuda::OptDeviceView<const i32, 1> dv_map;
  if (with_ids) dv_ids = din(d_ids, M, k);
  if (with_map) dv_map = din1(d_map);
  const DeviceView<const T, 3> dv_inputs(d_inputs.data(), {M, k, H}, {ld_token, ld_slot, 1});
  for (int run = 0; run < 2; ++run) {
    d_out.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::moe_fused_mul_sum<T>(dv_inputs, din(d_weights, M, k), dout(d_out, M, H), dv_ids, dv_map,
                                                     stream);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(BitwiseEqual(d_out.download(), out)) << "run " << run;
  }
}

template <class T>
void fused_grid(cudaStream_t stream, std::uint64_t seed) {
  const Index ks[] = {1, 2, 8, 16};
  const MulSumMap maps[] = {MulSumMap::kNone, MulSumMap::kNoneWithIds, MulSumMap::kEp, MulSumMap::kArbitrary};
  int i = 0;
  for (Index M : kTokenCounts) {
    for (const MulSumMap map : maps) {
      const Index k = M >= 65536 ? 2 : ks[i % 4];
      const Index H = M >= 1000 ? 8 : 72;
      check_fused<T>(stream, M, k, H, map, i % 3 == 2 ? 4 : 0, seed++);
      if (::testing::Test::HasFailure()) return;
      ++i;
    }
  }
}

TEST_F(CudaOps, FusedMulSumMatchesCpuBitwise) {
  fused_grid<bfloat16>(stream_, 5000);
  fused_grid<half>(stream_, 5100);
  fused_grid<float>(stream_, 5200);
}

TEST_F(CudaOps, FusedMulSumRejectsBadInputs) {
  const Index M = 8, k = 2, H = 8, E = 8, kBig = 1024;
  Random rng(19);
  const std::vector<float> inputs = rng.normal_vector<float>(M * k * H * 2), weights = rng.normal_vector<float>(M * k);
  const std::vector<i32> ids = random_ids(rng, M, k, E, false), map = {0, 1, -1, -1, 2, 3, -1, -1};
  std::vector<float> h_out(kBig);
  DeviceBuffer<float> d_inputs(inputs), d_weights(weights), d_out = dbuf<float>(kBig);
  DeviceBuffer<i32> d_ids(ids), d_map(map);
  d_out.fill_bytes(kUntouched);
  device_sync();
  struct Cfg {
    Index in_stride = 1;  // stride of the last input dimension
    Index w_cols = 2, out_cols = 8, ids_rows = 8;
    bool ids = false, map = false;
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const HostView<const float, 3> h_in(inputs.data(), {M, k, H}, {k * H * c.in_stride, H * c.in_stride, c.in_stride});
    const DeviceView<const float, 3> d_in(d_inputs.data(), {M, k, H}, {k * H * c.in_stride, H * c.in_stride, c.in_stride});
    std::optional<HostView<const i32, 2>> h_ids;
    std::optional<HostView<const i32, 1>> h_map;
    moe::cuda::OptDeviceView<const i32, 2> dv_ids;
    moe::cuda::OptDeviceView<const i32, 1> dv_map;
    if (c.ids) {
      h_ids = hin(ids, c.ids_rows, k);
      dv_ids = din(d_ids, c.ids_rows, k);
    }
    if (c.map) {
      h_map = hin1(map);
      dv_map = din1(d_map);
    }
    const Status gpu = moe::cuda::moe_fused_mul_sum<float>(d_in, din(d_weights, M, c.w_cols), dout(d_out, M, c.out_cols),
                                                           dv_ids, dv_map, stream_);
    stream_sync(stream_);
    const Status cpu = moe::cpu::moe_fused_mul_sum<float>(h_in, hin(weights, M, c.w_cols), hout(h_out, M, c.out_cols),
                                                          h_ids, h_map);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_out));
  };
  {
    Cfg c;
    c.map = true;  // without topk_ids
    rejected(c, "topk_ids");
  }
  {
    Cfg c;
    c.ids = true;
    c.map = true;
    c.ids_rows = M - 1;
    rejected(c, "topk_ids");
  }
  {
    Cfg c;
    c.w_cols = k + 1;
    rejected(c, "topk_weights");
  }
  {
    Cfg c;
    c.out_cols = H - 1;
    rejected(c, "output");
  }
  {
    Cfg c;
    c.in_stride = 2;
    rejected(c, "inputs");
  }
}

// ---------------------------------------------------------------------------------------------
// eplb_logical_to_physical

moe::cuda::ReplicaChoice to_cuda(moe::cpu::ReplicaChoice c) {
  return c == moe::cpu::ReplicaChoice::kTokenHash ? moe::cuda::ReplicaChoice::kTokenHash
                                                  : moe::cuda::ReplicaChoice::kSlotPosition;
}

struct EplbCase {
  Index M, k, L, max_replicas, P;
  moe::cpu::ReplicaChoice choice;
  bool with_load;
  Index num_unpadded;
  bool invalid_ids, checked;
  Index map_pad;
};

void check_eplb(cudaStream_t stream, const EplbCase& c, std::uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "M=" << c.M << " k=" << c.k << " L=" << c.L << " max_replicas=" << c.max_replicas
                                    << " P=" << c.P << " choice=" << static_cast<int>(c.choice) << " load=" << c.with_load
                                    << " unpadded=" << c.num_unpadded << " invalid=" << c.invalid_ids
                                    << " checked=" << c.checked << " map_pad=" << c.map_pad);
  Random rng(seed);
  const Index ld_map = c.max_replicas + c.map_pad;
  std::vector<i32> count(static_cast<std::size_t>(c.L)), map(static_cast<std::size_t>(c.L * ld_map));
  for (Index e = 0; e < c.L; ++e) {
    count[e] = rng.integer(1, static_cast<int>(c.max_replicas));
    for (Index r = 0; r < ld_map; ++r) {  // entries past the count are junk: never read
      map[e * ld_map + r] = r < count[e] ? rng.integer(0, static_cast<int>(c.P - 1)) : (r % 2 ? -9 : static_cast<i32>(c.P + 5));
    }
  }
  const std::vector<i32> ids = random_ids(rng, c.M, c.k, c.L, c.invalid_ids);
  std::vector<i64> load0(static_cast<std::size_t>(c.P));
  for (auto& x : load0) x = rng.integer(0, 1000);
  std::vector<i32> phys(static_cast<std::size_t>(c.M * c.k));
  std::vector<i64> load = load0;
  std::optional<HostView<i64, 1>> h_load;
  if (c.with_load) h_load = hout1(load);
  const Status cpu = moe::cpu::eplb_logical_to_physical(hin(ids, c.M, c.k), hin(map, c.L, c.max_replicas, ld_map),
                                                        hin1(count), c.P, c.choice, hout(phys, c.M, c.k), h_load,
                                                        c.num_unpadded);
  ASSERT_TRUE(cpu.is_ok()) << cpu.to_string();

  DeviceBuffer<i32> d_ids(ids), d_map(map), d_count(count), d_phys = dbuf<i32>(c.M * c.k);
  DeviceBuffer<i64> d_load(load0);
  moe::cuda::OptDeviceView<i64, 1> dv_load;
  if (c.with_load) dv_load = dout1(d_load);
  for (int run = 0; run < 2; ++run) {
    d_load.upload(load0);
    d_phys.fill_bytes(kOutputPoison[run]);
    device_sync();
    const Status s = moe::cuda::eplb_logical_to_physical(din(d_ids, c.M, c.k), din(d_map, c.L, c.max_replicas, ld_map),
                                                         din1(d_count), c.P, to_cuda(c.choice), dout(d_phys, c.M, c.k),
                                                         dv_load, c.num_unpadded, stream, c.checked);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    stream_sync(stream);
    EXPECT_TRUE(ExactlyEqual(d_phys.download(), phys)) << "physical_ids, run " << run;
    EXPECT_TRUE(ExactlyEqual(d_load.download(), load)) << "expert_load, run " << run;
  }
}

TEST_F(CudaOps, EplbMatchesCpu) {
  std::uint64_t seed = 6000;
  int i = 0;
  for (Index M : kTokenCounts) {
    for (auto choice : {moe::cpu::ReplicaChoice::kTokenHash, moe::cpu::ReplicaChoice::kSlotPosition}) {
      for (bool with_load : {false, true}) {
        const Index L = i % 2 ? 256 : 64;
        const EplbCase c{M, M >= 65536 ? 8 : (i % 3 == 0 ? 1 : 8), L, i % 3 == 1 ? 1 : 4, L + 32, choice, with_load,
                         i % 4 == 3 ? M / 2 : -1, i % 2 == 0, i % 5 == 0, i % 3 == 2 ? 3 : 0};
        check_eplb(stream_, c, seed++);
        if (HasFailure()) return;
        ++i;
      }
    }
  }
}

TEST_F(CudaOps, EplbRejectsBadInputs) {
  const Index M = 8, k = 2, L = 6, Rmax = 3, P = 10, kBig = 1024;
  Random rng(23);
  const std::vector<i32> ids = random_ids(rng, M, k, L, true);
  const std::vector<i32> count = {1, 2, 3, 1, 2, 3};
  std::vector<i32> map(L * Rmax);
  for (auto& x : map) x = rng.integer(0, static_cast<int>(P - 1));
  std::vector<i32> h_phys(kBig);
  std::vector<i64> h_load(kBig);
  DeviceBuffer<i32> d_ids(ids), d_map(map), d_count(count), d_phys = dbuf<i32>(kBig);
  DeviceBuffer<i64> d_load = dbuf<i64>(kBig);
  d_phys.fill_bytes(kUntouched);
  d_load.fill_bytes(kUntouched);
  device_sync();
  struct Cfg {
    std::vector<i32> count, map;
    Index P = 10, load_n = 10, phys_cols = 2;
    bool checked = true;
  };
  auto run = [&](const Cfg& c) -> std::pair<Status, Status> {
    d_count.upload(c.count);
    d_map.upload(c.map);
    device_sync();
    const Status gpu = moe::cuda::eplb_logical_to_physical(
        din(d_ids, M, k), din(d_map, L, Rmax), din1(d_count), c.P, moe::cuda::ReplicaChoice::kTokenHash,
        dout(d_phys, M, c.phys_cols), dout1(d_load, c.load_n), -1, stream_, c.checked);
    stream_sync(stream_);
    const Status cpu = moe::cpu::eplb_logical_to_physical(hin(ids, M, k), hin(c.map, L, Rmax), hin1(c.count), c.P,
                                                          moe::cpu::ReplicaChoice::kTokenHash, hout(h_phys, M, c.phys_cols),
                                                          hout1(h_load, c.load_n), -1);
    return {gpu, cpu};
  };
  auto rejected = [&](const Cfg& c, std::string_view name) {
    const auto [gpu, cpu] = run(c);
    EXPECT_TRUE(SameRejection(gpu, cpu, name));
    EXPECT_TRUE(Untouched(d_phys));
    EXPECT_TRUE(Untouched(d_load));
  };
  {
    Cfg c{count, map};
    c.P = 0;
    c.load_n = 0;
    rejected(c, "num_physical_experts");
  }
  {
    Cfg c{count, map};
    c.load_n = P + 1;
    rejected(c, "expert_load");
  }
  {
    Cfg c{count, map};
    c.phys_cols = k + 1;
    rejected(c, "physical_ids");
  }
  std::vector<i32> zero_count = count, big_count = count, bad_map = map;
  zero_count[2] = 0;
  big_count[4] = static_cast<i32>(Rmax + 1);
  bad_map[1 * Rmax + 1] = static_cast<i32>(P);  // logical 1 has 2 replicas: replica 1 is read
  rejected(Cfg{zero_count, map}, "logical_replica_count");
  rejected(Cfg{big_count, map}, "logical_replica_count");
  rejected(Cfg{count, bad_map}, "logical_to_physical_map");
  // Unchecked: ids whose count or physical id is bad get -1 and are not counted; no fault.
  for (const Cfg& bad : {Cfg{zero_count, map}, Cfg{big_count, map}, Cfg{count, bad_map}}) {
    Cfg c = bad;
    c.checked = false;
    d_load.fill_bytes(0);
    device_sync();
    const auto [gpu, cpu] = run(c);
    ASSERT_TRUE(gpu.is_ok()) << gpu.to_string();
    const std::vector<i32> phys = d_phys.download();
    const std::vector<i64> load = d_load.download();
    i64 counted = 0;
    for (Index s = 0; s < M * k; ++s) {
      EXPECT_TRUE(phys[s] >= -1 && phys[s] < P) << phys[s];
      counted += phys[s] >= 0;
    }
    i64 total = 0;
    for (Index p = 0; p < P; ++p) total += load[p];
    EXPECT_EQ(total, counted);
  }
}

}  // namespace
