// The CUDA headers included by a second translation unit of one binary (experts_stage_test.cu is
// the first): a header kernel with external linkage would be defined twice and fail the link.
// Its test runs the stage's checks from this unit.
#include <gtest/gtest.h>

#include "moe/cuda/kernel.cuh"
#include "moe/cuda/ops.cuh"
#include "moe/cuda/router.cuh"
#include "moe/quant/none.h"

namespace {

TEST(SecondTranslationUnit, TheStageRejectsMismatchedSegmentsFromHere) {
  using Stage = moe::cuda::ExpertsStage<moe::Experts<moe::SiluAndMul, moe::quant::BF16>, moe::bfloat16, moe::cuda::Sm80>;
  Stage::Weights w;
  w.w13 = moe::DeviceView<const moe::bfloat16, 3>(nullptr, {2, 16, 8});
  w.w2 = moe::DeviceView<const moe::bfloat16, 3>(nullptr, {2, 8, 8});
  Stage::Rows r;
  const moe::Status s = Stage().run(w, r, {});
  EXPECT_FALSE(s.is_ok());
  EXPECT_NE(s.to_string().find("w13"), std::string::npos) << s.to_string();  // null data of a non-empty tensor
}

}  // namespace
