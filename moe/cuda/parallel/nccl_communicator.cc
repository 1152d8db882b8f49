#include "moe/cuda/parallel/nccl_communicator.h"

#include <cstring>

#include "moe/cuda/check.h"
#include "moe/cuda/parallel/nccl_runtime.h"

namespace moe::cuda {
namespace {

Status nccl_status(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return Status::ok();
  return make_status(StatusCode::kCudaError, what, " failed: ", NcclRuntime::get().error_string(r));
}
#define MOE_NCCL_TRY(expr) MOE_RETURN_IF_ERROR(nccl_status((expr), #expr))

constexpr int kMaxRanks = 1 << 16;

}  // namespace

Status NcclCommunicator::available() {
  if (!NcclRuntime::get().available()) {
    return unsupported("NCCL: libnccl.so.2 was not found or lacks a symbol (set MOE_NCCL_LIBRARY to its path)");
  }
  return Status::ok();
}

Status NcclCommunicator::create_all(std::span<const int> devices, std::vector<std::unique_ptr<NcclCommunicator>>* out) {
  MOE_RETURN_IF_ERROR(available());
  int count = 0;
  MOE_CUDA_TRY(cudaGetDeviceCount(&count));
  if (devices.empty() || devices.size() > static_cast<std::size_t>(count)) {
    return invalid_argument("devices: expected 1 to ", count, " GPUs (the visible ones), got ", devices.size());
  }
  for (std::size_t i = 0; i < devices.size(); ++i) {
    if (devices[i] < 0 || devices[i] >= count) return invalid_argument("devices: entry ", i, " is ", devices[i], "; expected [0, ", count, ")");
    for (std::size_t j = 0; j < i; ++j) {
      if (devices[j] == devices[i]) return invalid_argument("devices: GPU ", devices[i], " is listed twice");
    }
  }
  const auto n = static_cast<int>(devices.size());
  std::vector<ncclComm_t> comms(devices.size(), nullptr);
  const NcclRuntime& nccl = NcclRuntime::get();
  MOE_NCCL_TRY(nccl.comm_init_all(comms.data(), n, devices.data()));
  out->clear();
  for (int r = 0; r < n; ++r) out->emplace_back(new NcclCommunicator(comms[r], n, r, devices[r]));
  return Status::ok();
}

Status NcclCommunicator::unique_id(UniqueId* id) {
  MOE_RETURN_IF_ERROR(available());
  ncclUniqueId u;
  MOE_NCCL_TRY(NcclRuntime::get().get_unique_id(&u));
  static_assert(sizeof(u.internal) == std::tuple_size_v<UniqueId>);
  std::memcpy(id->data(), u.internal, id->size());
  return Status::ok();
}

Status NcclCommunicator::create(int size, int rank, const UniqueId& id, int device, std::unique_ptr<NcclCommunicator>* out) {
  MOE_RETURN_IF_ERROR(available());
  if (size < 1 || size > kMaxRanks) return invalid_argument("size: expected 1 to ", kMaxRanks, " ranks, got ", size);
  if (rank < 0 || rank >= size) return invalid_argument("rank: expected [0, size=", size, "), got ", rank);
  int count = 0;
  MOE_CUDA_TRY(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) return invalid_argument("device: expected [0, ", count, "), got ", device);
  int previous = 0;
  MOE_CUDA_TRY(cudaGetDevice(&previous));
  MOE_CUDA_TRY(cudaSetDevice(device));  // NCCL binds the communicator to the current device
  ncclUniqueId u;
  std::memcpy(u.internal, id.data(), id.size());
  ncclComm_t comm = nullptr;
  const Status made = nccl_status(NcclRuntime::get().comm_init_rank(&comm, size, u, rank), "ncclCommInitRank");
  MOE_CUDA_TRY(cudaSetDevice(previous));
  MOE_RETURN_IF_ERROR(made);
  out->reset(new NcclCommunicator(comm, size, rank, device));
  return Status::ok();
}

Status NcclCommunicator::group_start() {
  MOE_RETURN_IF_ERROR(available());
  MOE_NCCL_TRY(NcclRuntime::get().group_start());
  return Status::ok();
}

Status NcclCommunicator::group_end() {
  MOE_RETURN_IF_ERROR(available());
  MOE_NCCL_TRY(NcclRuntime::get().group_end());
  return Status::ok();
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_) (void)NcclRuntime::get().comm_destroy(comm_);
}

Status NcclCommunicator::all_to_all_v(const void* send, std::span<const std::size_t> send_bytes, void* recv,
                                      std::span<const std::size_t> recv_bytes, cudaStream_t stream) {
  // Packed blocks: offsets are the prefix sums (checked for overflow by the general form).
  std::vector<std::size_t> send_offsets(send_bytes.size()), recv_offsets(recv_bytes.size());
  std::size_t s = 0, r = 0;
  for (std::size_t i = 0; i < send_bytes.size(); ++i) {
    send_offsets[i] = s;
    s = send_bytes[i] > SIZE_MAX - s ? SIZE_MAX : s + send_bytes[i];
  }
  for (std::size_t i = 0; i < recv_bytes.size(); ++i) {
    recv_offsets[i] = r;
    r = recv_bytes[i] > SIZE_MAX - r ? SIZE_MAX : r + recv_bytes[i];
  }
  return all_to_all_v(send, send_offsets, send_bytes, recv, recv_offsets, recv_bytes, stream);
}

Status NcclCommunicator::all_to_all_v(const void* send, std::span<const std::size_t> send_offsets,
                                      std::span<const std::size_t> send_bytes, void* recv,
                                      std::span<const std::size_t> recv_offsets, std::span<const std::size_t> recv_bytes,
                                      cudaStream_t stream) {
  const auto n = static_cast<std::size_t>(size_);
  if (send_bytes.size() != n || recv_bytes.size() != n || send_offsets.size() != n || recv_offsets.size() != n) {
    return invalid_argument("all_to_all_v: expected ", n, " send and recv counts and offsets (one per rank), got ",
                            send_bytes.size(), ", ", recv_bytes.size(), ", ", send_offsets.size(), " and ", recv_offsets.size());
  }
  for (std::size_t r = 0; r < n; ++r) {
    if (send_bytes[r] > SIZE_MAX - send_offsets[r] || recv_bytes[r] > SIZE_MAX - recv_offsets[r]) {
      return invalid_argument("all_to_all_v: block ", r, " overflows (offset + count)");
    }
    if ((send_bytes[r] > 0 && !send) || (recv_bytes[r] > 0 && !recv)) {
      return invalid_argument("all_to_all_v: null buffer with a non-zero count for rank ", r);
    }
  }
  const NcclRuntime& nccl = NcclRuntime::get();
  const auto* s = static_cast<const std::byte*>(send);
  auto* d = static_cast<std::byte*>(recv);
  MOE_NCCL_TRY(nccl.group_start());
  Status issued;
  for (std::size_t r = 0; r < n && issued.is_ok(); ++r) {
    if (send_bytes[r] > 0) {
      issued = nccl_status(nccl.send(s + send_offsets[r], send_bytes[r], ncclUint8, static_cast<int>(r), comm_, stream), "ncclSend");
    }
    if (issued.is_ok() && recv_bytes[r] > 0) {
      issued = nccl_status(nccl.recv(d + recv_offsets[r], recv_bytes[r], ncclUint8, static_cast<int>(r), comm_, stream), "ncclRecv");
    }
  }
  const Status ended = nccl_status(nccl.group_end(), "ncclGroupEnd");  // always close the group
  MOE_RETURN_IF_ERROR(issued);
  return ended;
}

Status NcclCommunicator::all_gather(const void* send, std::size_t bytes, void* recv, cudaStream_t stream) {
  if (bytes > 0 && (!send || !recv)) return invalid_argument("all_gather: null buffer with ", bytes, " bytes");
  if (bytes > SIZE_MAX / static_cast<std::size_t>(size_)) return invalid_argument("all_gather: ", bytes, " bytes x ", size_, " ranks overflow");
  MOE_NCCL_TRY(NcclRuntime::get().all_gather(send, recv, bytes, ncclUint8, comm_, stream));
  return Status::ok();
}

Status NcclCommunicator::all_reduce_sum(float* data, std::size_t count, cudaStream_t stream) {
  if (count > 0 && !data) return invalid_argument("all_reduce_sum: null data with ", count, " elements");
  MOE_NCCL_TRY(NcclRuntime::get().all_reduce(data, data, count, ncclFloat32, ncclSum, comm_, stream));
  return Status::ok();
}

}  // namespace moe::cuda
