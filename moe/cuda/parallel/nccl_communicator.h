// The collectives of moe/parallel/communicator.h on device memory, ordered on a CUDA stream,
// through NCCL: what the expert-parallel dispatch/combine and tensor parallelism's all-reduce run
// on across GPUs. Same block layout as the host Communicator (block r of a buffer holds the bytes
// for or from rank r, packed in rank order); like NCCL itself, the calls enqueue work on the stream
// and return without waiting for it.
//
// Creation: `create_all` makes one communicator per listed GPU of this process (the
// single-process multi-GPU mode: drive each from its own thread, or issue the ranks' calls between
// group_start()/group_end()); `unique_id` + `create` make one rank of a group spread over
// processes (rank 0 makes the id and hands it to the others out of band).
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <memory>
#include <span>
#include <vector>

#include "moe/status.h"

typedef struct ncclComm* ncclComm_t;

namespace moe::cuda {

class NcclCommunicator {
 public:
  using UniqueId = std::array<char, 128>;

  // Whether libnccl could be loaded (moe/cuda/parallel/nccl_runtime.h), and the reason when not.
  static Status available();
  static Status create_all(std::span<const int> devices, std::vector<std::unique_ptr<NcclCommunicator>>* out);
  static Status unique_id(UniqueId* id);
  static Status create(int size, int rank, const UniqueId& id, int device, std::unique_ptr<NcclCommunicator>* out);
  // Several ranks' calls from one thread (create_all's communicators) go between these.
  static Status group_start();
  static Status group_end();

  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }

  // Sends send_bytes[r] bytes (block r of `send`) to rank r and receives recv_bytes[r] bytes from
  // rank r into block r of `recv`: grouped ncclSend/ncclRecv. Both count arrays have size()
  // entries, known on the host (exchange them first with a fixed-size call, as the normal
  // dispatch does, or use fixed capacities, as the low-latency one does).
  Status all_to_all_v(const void* send, std::span<const std::size_t> send_bytes, void* recv,
                      std::span<const std::size_t> recv_bytes, cudaStream_t stream);
  // The same with each block's byte offset given (blocks of a fixed capacity, partly filled).
  Status all_to_all_v(const void* send, std::span<const std::size_t> send_offsets, std::span<const std::size_t> send_bytes,
                      void* recv, std::span<const std::size_t> recv_offsets, std::span<const std::size_t> recv_bytes,
                      cudaStream_t stream);
  // Every rank's `bytes` bytes into block r of `recv` (size() * bytes).
  Status all_gather(const void* send, std::size_t bytes, void* recv, cudaStream_t stream);
  // In-place fp32 sum over the ranks (NCCL's reduction order: fixed for a fixed topology).
  Status all_reduce_sum(float* data, std::size_t count, cudaStream_t stream);

 private:
  NcclCommunicator(ncclComm_t comm, int size, int rank, int device) : comm_(comm), size_(size), rank_(rank), device_(device) {}
  ncclComm_t comm_;
  int size_, rank_, device_;
};

}  // namespace moe::cuda
