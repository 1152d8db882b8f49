// moe::Kernel<Spec, Backend>: one MoE layer forward for a Spec on a backend.
//
// Backends specialize this template: moe/cpu/kernel.h (moe::cpu::Eigen, the reference) and
// moe/cuda/ (moe::cuda::Sm80 / Sm90, see moe/cuda/README.md). Every specialization offers
//   Status can_implement(const Arguments&) const;      // before anything is written
//   std::size_t workspace_bytes(const Arguments&) const;
//   Status run(const Arguments&, std::span<std::byte> workspace) const;
#pragma once

#include "moe/arguments.h"
#include "moe/spec.h"

namespace moe {

namespace detail {
template <class>
inline constexpr bool dependent_false = false;
}

template <class Spec, class Backend>
class Kernel {
  static_assert(detail::dependent_false<Backend>,
                "moe::Kernel: no implementation for this Backend. Include moe/cpu/kernel.h for moe::cpu::Eigen; "
                "the CUDA backend lives in moe/cuda/.");
};

}  // namespace moe
