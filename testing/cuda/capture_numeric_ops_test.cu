// The ops captured in a CUDA graph, and the storage-type conversions of device and host.
#include "testing/cuda/ops_test_support.cuh"

namespace {

// ---------------------------------------------------------------------------------------------
// Layout helpers and stream capture.

TEST_F(CudaOps, SizeHelpersMatchCpu) {
  for (Index M : {0, 1, 7, 1000}) {
    for (int k : {1, 3, 16}) {
      for (Index E : {1, 7, 64, 512}) {
        for (Index A : {0, 1, 16, 128}) {
          EXPECT_EQ(moe::cuda::moe_permute_rows(M, k, E, A), moe::cpu::moe_permute_rows(M, k, E, A));
          if (A == 0) continue;
          for (bool pad : {false, true}) {
            const auto a = moe::cuda::moe_align_block_size_sizes(M * k, E, A, pad);
            const auto b = moe::cpu::moe_align_block_size_sizes(M * k, E, A, pad);
            EXPECT_EQ(a.max_num_tokens_padded, b.max_num_tokens_padded);
            EXPECT_EQ(a.num_blocks, b.num_blocks);
          }
        }
      }
    }
  }
}

// The unchecked ops are stream-ordered with no synchronization or allocation: captured in one
// CUDA graph, replay gives the eager results bit for bit.
TEST_F(CudaOps, GraphCaptureReplaysEagerResults) {
  using P = moe::routing::SoftmaxTopK;
  const Index M = 500, E = 64, k = 4, H = 32, A = 16;
  Random rng(7000);
  const MapSetup ms = ep_map(4, 3, E, moe::ExpertPlacement::kLinear);
  const Index El = ms.num_local, R = moe::cuda::moe_permute_rows(M, k, El, A);
  const auto sz = moe::cuda::moe_align_block_size_sizes(M * k, E, A, true);
  const std::vector<float> logits = rng.gapped_logits(M, E);
  const std::vector<bfloat16> hidden = rng.normal_vector<bfloat16>(M * H);
  DeviceBuffer<float> d_logits(logits), d_w = dbuf<float>(M * k);
  DeviceBuffer<bfloat16> d_hidden(hidden), d_ph = dbuf<bfloat16>(R * H), d_out = dbuf<bfloat16>(M * H);
  DeviceBuffer<i32> d_ids = dbuf<i32>(M * k), d_map(ms.map), d_inv = dbuf<i32>(M * k), d_pidx = dbuf<i32>(R),
                    d_midx = dbuf<i32>(R), d_sorted = dbuf<i32>(sz.max_num_tokens_padded),
                    d_eids = dbuf<i32>(sz.num_blocks), d_total = dbuf<i32>(1);
  DeviceBuffer<i64> d_eft = dbuf<i64>(El + 1);
  Workspace ws_sel(moe::cuda::select_experts_workspace_bytes(M, E));
  Workspace ws_perm(moe::cuda::moe_permute_workspace_bytes(M, k, E, El, A));
  Workspace ws_align(moe::cuda::moe_align_block_size_workspace_bytes(M, k, E));
  auto enqueue = [&](cudaStream_t s) -> Status {
    MOE_RETURN_IF_ERROR(moe::cuda::select_experts<P>(din(d_logits, M, E), k, {true, 1.0f}, std::nullopt, dout(d_ids, M, k),
                                                     dout(d_w, M, k), ws_sel.span(0), s));
    MOE_RETURN_IF_ERROR(moe::cuda::moe_permute<bfloat16>(
        din(d_hidden, M, H), std::nullopt, din(d_ids, M, k), E, El, din1(d_map), A, -1,
        {dout(d_ph, R, H), std::nullopt, dout1(d_eft), dout1(d_inv), dout1(d_pidx), dout1(d_midx)}, ws_perm.span(0), s));
    MOE_RETURN_IF_ERROR(moe::cuda::moe_align_block_size(din(d_ids, M, k), A, E, din1(d_map), true, true, dout1(d_sorted),
                                                        dout1(d_eids), dout1(d_total), ws_align.span(0), s));
    return moe::cuda::moe_unpermute<bfloat16>(din(d_ph, R, H), din(d_w, M, k), din1(d_inv), din1(d_eft),
                                              dout(d_out, M, H), s);
  };
  auto snapshot = [&]() {
    std::vector<std::vector<std::uint8_t>> all;
    auto bytes = [&](const auto& buf) {
      const auto v = buf.download();
      const auto* p = reinterpret_cast<const std::uint8_t*>(v.data());
      all.emplace_back(p, p + v.size() * sizeof(v[0]));
    };
    bytes(d_ids), bytes(d_w), bytes(d_ph), bytes(d_eft), bytes(d_inv), bytes(d_pidx), bytes(d_midx), bytes(d_sorted),
        bytes(d_eids), bytes(d_total), bytes(d_out);
    return all;
  };
  auto poison_outputs = [&](unsigned char b) {
    d_ids.fill_bytes(b), d_w.fill_bytes(b), d_ph.fill_bytes(b), d_eft.fill_bytes(b), d_inv.fill_bytes(b);
    d_pidx.fill_bytes(b), d_midx.fill_bytes(b), d_sorted.fill_bytes(b), d_eids.fill_bytes(b), d_total.fill_bytes(b);
    d_out.fill_bytes(b);
    device_sync();
  };
  poison_outputs(0xFF);
  ASSERT_TRUE(enqueue(stream_).is_ok());
  stream_sync(stream_);
  const auto eager = snapshot();

  poison_outputs(0x5A);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal), cudaSuccess);
  const Status captured = enqueue(stream_);
  ASSERT_EQ(cudaStreamEndCapture(stream_, &graph), cudaSuccess);
  ASSERT_TRUE(captured.is_ok()) << captured.to_string();
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream_), cudaSuccess);
  stream_sync(stream_);
  const auto replayed = snapshot();
  ASSERT_EQ(eager.size(), replayed.size());
  for (std::size_t i = 0; i < eager.size(); ++i) EXPECT_TRUE(eager[i] == replayed[i]) << "output " << i << " differs";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

}  // namespace


// ---- storage-type conversions: the device's cvt instructions vs the host's software rounding ----

namespace numeric_check {

__global__ void round_trip_kernel(const std::uint32_t* bits, std::size_t n, std::uint16_t* bf16, std::uint16_t* f16,
                                  std::uint32_t* f16_back) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float x = std::bit_cast<float>(bits[i]);
    bf16[i] = moe::bfloat16::from_float(x);
    f16[i] = moe::half::from_float(x);
    f16_back[i] = std::bit_cast<std::uint32_t>(moe::half::to_float(static_cast<std::uint16_t>(bits[i] & 0xffffu)));
  }
}

}  // namespace numeric_check

// Every float rounds to the same bf16 and f16 bits on both sides (random bit patterns plus the
// edges: ties, subnormal boundaries, overflow, infinities, NaNs), and every f16 widens alike.
TEST_F(CudaOps, StorageConversionsMatchTheHostBitForBit) {
  std::vector<std::uint32_t> bits = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
                                     0x7f7fffffu, 0x477fefffu, 0x477ff000u, 0x38800000u, 0x387fffffu, 0x33000000u,
                                     0x33000001u, 0x32ffffffu, 0x3f808000u, 0x3f818000u, 0x00000001u, 0x3f800001u};
  std::uint64_t z = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < (1 << 20); ++i) {
    z ^= z << 13, z ^= z >> 7, z ^= z << 17;
    bits.push_back(static_cast<std::uint32_t>(z >> 16));
  }
  for (std::uint32_t h = 0; h < 0x10000u; ++h) bits.push_back(h);  // every f16 pattern, for to_float
  DeviceBuffer<std::uint32_t> d_bits(bits);
  DeviceBuffer<std::uint16_t> d_bf16(bits.size()), d_f16(bits.size());
  DeviceBuffer<std::uint32_t> d_back(bits.size());
  numeric_check::round_trip_kernel<<<256, 256>>>(d_bits.data(), bits.size(), d_bf16.data(), d_f16.data(), d_back.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto bf16 = d_bf16.download(), f16 = d_f16.download();
  const auto back = d_back.download();
  int mismatches = 0;
  for (std::size_t i = 0; i < bits.size() && mismatches < 5; ++i) {
    const float x = std::bit_cast<float>(bits[i]);
    const std::uint32_t host_back = std::bit_cast<std::uint32_t>(moe::half::to_float(static_cast<std::uint16_t>(bits[i] & 0xffffu)));
    if (bf16[i] != moe::bfloat16::from_float(x) || f16[i] != moe::half::from_float(x) || back[i] != host_back) {
      ++mismatches;
      ADD_FAILURE() << std::hex << "float bits 0x" << bits[i] << ": device bf16 0x" << bf16[i] << " host 0x"
                    << moe::bfloat16::from_float(x) << ", device f16 0x" << f16[i] << " host 0x"
                    << moe::half::from_float(x) << ", f16->float device 0x" << back[i] << " host 0x" << host_back;
    }
  }
  EXPECT_EQ(mismatches, 0);
}
