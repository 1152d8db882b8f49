#include <gtest/gtest.h>
#include "moe/cpu/kernel.h"
#include "moe/quant/none.h"
using Spec = moe::Spec<moe::routing::SoftmaxTopK, moe::StandardPrepareFinalize<>, moe::Experts<moe::SiluAndMul, moe::quant::BF16>>;
TEST(Smoke, Compiles) {
  moe::Kernel<Spec, moe::cpu::Eigen> k;
  moe::Kernel<Spec, moe::cpu::Eigen>::Arguments a;
  EXPECT_FALSE(k.can_implement(a).is_ok());
}
