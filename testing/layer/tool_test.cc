// The `moe` command-line tool through moe::cli::run_tool: `run` writes exactly what
// MoeLayer::forward returns, `info` describes the layer, `bench` times a tiny checkpoint, and every
// bad input exits non-zero (2: usage, 1: a failed command) with a one-line message and no output
// file (neither a partial one nor a temporary left behind).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "moe/io/json.h"
#include "moe/io/safetensors.h"
#include "moe/layer/model_config.h"
#include "moe/layer/moe_layer.h"
#include "testing/layer/hf_reference.h"
#include "testing/layer/quantized_checkpoint.h"
#include "testing/layer/weight_only_model.h"
#include "moe/io/synthetic_checkpoint.h"
#include "testing/lib/compare.h"
#include "testing/lib/random.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using layer::MoeLayer;
using layer::ParallelLayout;
using io::HfCheckpointWriter;
using io::HfLayerSpec;

struct ToolResult {
  int rc = -1;
  std::string out, err;
};

ToolResult tool(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  ToolResult r;
  r.rc = cli::run_tool(args, out, err);
  r.out = out.str();
  r.err = err.str();
  return r;
}

std::string describe(const std::vector<std::string>& args, const ToolResult& r) {
  std::string s = "moe";
  for (const std::string& a : args) s += " " + a;
  return s + "\n  rc " + std::to_string(r.rc) + "\n  out: " + r.out + "\n  err: " + r.err;
}

HfLayerSpec spec_of(std::string arch) {
  HfLayerSpec s;
  s.architecture = std::move(arch);
  if (s.architecture == "Llama4ForCausalLM") s.top_k = 1;
  return s;
}

struct Model {
  std::string dir, config, weights, prefix;
  HfLayerSpec spec;
};

Model write_model(const std::string& name, const HfLayerSpec& spec) {
  Model m;
  m.dir = testing::hf::make_test_dir("tool_" + name);
  HfCheckpointWriter w(spec);
  const Status s = w.write(m.dir);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  m.config = m.dir + "/config.json";
  m.weights = m.dir + "/model.safetensors";
  m.prefix = w.prefix();
  m.spec = spec;
  return m;
}

// An inputs file: hidden_states [M, H] (f32 or bf16) and optionally router_logits [M, E].
struct Inputs {
  std::vector<float> hidden, logits;
  std::vector<bfloat16> hidden_bf16;
};

Inputs write_inputs(const std::string& path, Index M, Index H, std::uint64_t seed, Index E = 0, bool bf16 = false) {
  testing::Random rng(seed);
  Inputs in;
  in.hidden = rng.normal_vector<float>(static_cast<std::size_t>(M * H));
  std::vector<io::NamedTensor> t;
  if (bf16) {
    for (float& v : in.hidden) {
      in.hidden_bf16.push_back(bfloat16(v));
      v = to_float(in.hidden_bf16.back());
    }
    t.push_back({"hidden_states", DType::kBF16, {M, H}, in.hidden_bf16.data()});
  } else {
    t.push_back({"hidden_states", DType::kF32, {M, H}, in.hidden.data()});
  }
  if (E > 0) {
    in.logits = rng.gapped_logits(M, E, 0.2f);
    t.push_back({"router_logits", DType::kF32, {M, E}, in.logits.data()});
  }
  const Status s = io::write_safetensors(path, t);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  return in;
}

std::vector<std::string> base_args(const std::string& command, const Model& m) {
  return {command, "--model-config", m.config, "--weights", m.weights, "--layer-prefix", m.prefix};
}

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

DType dtype_named(const std::string& s) { return s == "f32" ? DType::kF32 : s == "f16" ? DType::kF16 : DType::kBF16; }

// What MoeLayer::forward gives for the same model, layout, dtype and inputs.
MoeLayer::Result direct_forward(const Model& m, const ParallelLayout& par, DType dtype, const Inputs& in, Index M) {
  layer::ModelConfig c;
  EXPECT_TRUE(layer::load_model_config(m.config, &c).is_ok());
  io::Checkpoint ckpt;
  EXPECT_TRUE(io::Checkpoint::open({m.weights}, &ckpt).is_ok());
  MoeLayer l;
  const Status ls = MoeLayer::load(c, par, dtype, ckpt, m.prefix, &l);
  EXPECT_TRUE(ls.is_ok()) << ls.to_string();
  const AnyTensor hidden = in.hidden_bf16.empty()
                               ? AnyTensor{const_cast<float*>(in.hidden.data()), DType::kF32, {M, c.hidden}, {}}
                               : AnyTensor{const_cast<bfloat16*>(in.hidden_bf16.data()), DType::kBF16, {M, c.hidden}, {}};
  std::optional<AnyTensor> logits;
  if (!in.logits.empty()) logits = AnyTensor{const_cast<float*>(in.logits.data()), DType::kF32, {M, c.num_experts}, {}};
  MoeLayer::Result r;
  const Status fs = l.forward(hidden, logits, &r);
  EXPECT_TRUE(fs.is_ok()) << fs.to_string();
  return r;
}

// The output file holds exactly `want`: same dtypes, shapes and bytes.
void expect_output_file(const std::string& path, const MoeLayer::Result& want, Index M, Index H, int k) {
  io::SafetensorsFile f;
  const Status s = io::SafetensorsFile::open(path, &f);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(f.names().size(), 3u);
  AnyTensor out, ids, w;
  ASSERT_TRUE(f.tensor("output", &out).is_ok());
  ASSERT_TRUE(f.tensor("topk_ids", &ids).is_ok());
  ASSERT_TRUE(f.tensor("topk_weights", &w).is_ok());
  EXPECT_EQ(out.dtype, want.output.dtype);
  EXPECT_EQ(out.extents, (std::vector<Index>{M, H}));
  EXPECT_EQ(ids.dtype, DType::kI32);
  EXPECT_EQ(ids.extents, (std::vector<Index>{M, k}));
  EXPECT_EQ(w.dtype, DType::kF32);
  EXPECT_EQ(w.extents, (std::vector<Index>{M, k}));
  ASSERT_EQ(f.info("output")->end - f.info("output")->begin, want.output.bytes.size());
  EXPECT_EQ(std::memcmp(out.data, want.output.bytes.data(), want.output.bytes.size()), 0) << "output differs";
  std::vector<std::int32_t> got_ids(static_cast<const std::int32_t*>(ids.data),
                                    static_cast<const std::int32_t*>(ids.data) + M * k);
  std::vector<float> got_w(static_cast<const float*>(w.data), static_cast<const float*>(w.data) + M * k);
  EXPECT_EQ(got_ids, want.topk_ids);
  EXPECT_EQ(got_w, want.topk_weights);
}

// ---- run ----------------------------------------------------------------------------------------

class RunTest : public ::testing::TestWithParam<std::string> {};

// Every architecture, f32: the file equals MoeLayer::forward's result.
TEST_P(RunTest, OutputEqualsForward) {
  const Model m = write_model("run_" + GetParam(), spec_of(GetParam()));
  const Index M = 6, H = m.spec.hidden;
  const std::string in_path = m.dir + "/in.safetensors", out_path = m.dir + "/out.safetensors";
  const Inputs in = write_inputs(in_path, M, H, 3);
  const std::vector<std::string> args =
      base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", out_path, "--dtype", "f32"};
  const ToolResult r = tool(args);
  ASSERT_EQ(r.rc, 0) << describe(args, r);
  EXPECT_EQ(r.err, "");
  EXPECT_NE(r.out.find(GetParam()), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("wrote " + out_path), std::string::npos) << r.out;
  expect_output_file(out_path, direct_forward(m, {}, DType::kF32, in, M), M, H, m.spec.top_k);
}

// The same file with its data buffer moved to an odd byte offset (one more space in the JSON
// header, which the format allows): every tensor is then misaligned.
std::string misaligned_copy(const std::string& path) {
  const std::string bytes = testing::hf::read_text(path);
  std::uint64_t n = 0;
  for (int k = 0; k < 8; ++k) n |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[k])) << (8 * k);
  std::string out(8, '\0');
  for (int k = 0; k < 8; ++k) out[k] = static_cast<char>(((n + 1) >> (8 * k)) & 0xff);
  out += bytes.substr(8, n) + " " + bytes.substr(8 + n);
  const std::string copy = path + ".odd.safetensors";
  testing::hf::write_text(copy, out);
  return copy;
}

// Legal files may place tensors at any byte offset: hidden states and router logits read from
// misaligned data give the same output as from aligned data (no misaligned typed reads).
TEST(Run, MisalignedInputsReadLikeAligned) {
  const Model m = write_model("run_misaligned", spec_of("Qwen3MoeForCausalLM"));
  const Index M = 5, H = m.spec.hidden;
  const std::string in_path = m.dir + "/in.safetensors";
  write_inputs(in_path, M, H, 11, m.spec.num_experts);
  const std::string odd = misaligned_copy(in_path);
  std::string outs[2];
  for (int i = 0; i < 2; ++i) {
    const std::string out_path = m.dir + "/out" + std::to_string(i) + ".safetensors";
    const std::vector<std::string> args =
        base_args("run", m) + std::vector<std::string>{"--inputs", i == 0 ? in_path : odd, "--output", out_path, "--dtype", "f32"};
    const ToolResult r = tool(args);
    ASSERT_EQ(r.rc, 0) << describe(args, r);
    outs[i] = testing::hf::read_text(out_path);
  }
  EXPECT_EQ(outs[0], outs[1]);
}

INSTANTIATE_TEST_SUITE_P(Architectures, RunTest,
                         ::testing::Values("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                                           "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "GptOssForCausalLM",
                                           "Llama4ForCausalLM"));

// Dtypes and parallel layouts: the tool loads exactly the layer the options describe.
TEST(Run, DtypesAndLayouts) {
  const Model m = write_model("run_layouts", spec_of("Qwen2MoeForCausalLM"));
  const Index M = 5, H = m.spec.hidden;
  const std::string in_path = m.dir + "/in.safetensors";
  const Inputs in = write_inputs(in_path, M, H, 4);
  struct Layout {
    std::vector<std::string> flags;
    ParallelLayout par;
  };
  std::vector<Layout> layouts;
  layouts.push_back({{}, {}});
  {
    ParallelLayout p;
    p.tp_size = 2;
    p.tp_rank = 1;
    layouts.push_back({{"--tp-size", "2", "--tp-rank", "1"}, p});
  }
  {
    ParallelLayout p;
    p.ep_size = 3;
    p.ep_rank = 2;
    p.placement = ExpertPlacement::kRoundRobin;
    layouts.push_back({{"--ep-size", "3", "--ep-rank", "2", "--expert-placement", "round_robin"}, p});
  }
  {
    ParallelLayout p;
    p.ep_size = 2;
    p.ep_rank = 0;
    p.tp_size = 4;
    p.tp_rank = 3;
    layouts.push_back({{"--ep-size", "2", "--ep-rank", "0", "--tp-size", "4", "--tp-rank", "3", "--expert-placement", "linear"}, p});
  }
  int i = 0;
  for (const std::string dtype : {"f32", "bf16", "f16", ""}) {
    for (const Layout& lay : layouts) {
      const std::string out_path = m.dir + "/out" + std::to_string(i++) + ".safetensors";
      std::vector<std::string> args = base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", out_path};
      if (!dtype.empty()) args = args + std::vector<std::string>{"--dtype", dtype};  // default: bf16
      args = args + lay.flags;
      const ToolResult r = tool(args);
      ASSERT_EQ(r.rc, 0) << describe(args, r);
      SCOPED_TRACE(describe(args, r));
      expect_output_file(out_path, direct_forward(m, lay.par, dtype_named(dtype), in, M), M, H, m.spec.top_k);
    }
  }
}

// router_logits in the inputs file drive the routing; bf16 hidden states are accepted.
// --ep-size/--tp-size without a rank: every rank in one process, the partials all-reduced (float
// sums in rank order r = ep_rank * tp_size + tp_rank, one rounding) into one full output, which is
// close to the single-rank forward (each partial is rounded to the dtype once before the sum).
TEST(Run, AllRanksInOneProcessGiveOneFullOutput) {
  const Model m = write_model("run_all_ranks", spec_of("Qwen2MoeForCausalLM"));
  const Index M = 7, H = m.spec.hidden;
  const std::string in_path = m.dir + "/in.safetensors";
  const Inputs in = write_inputs(in_path, M, H, 6);
  struct Layout {
    int ep, tp;
    ExpertPlacement placement;
    std::vector<std::string> flags;
    Index redundant = 0;
  };
  const Layout layouts[] = {
      {2, 1, ExpertPlacement::kLinear, {"--ep-size", "2"}},
      {1, 2, ExpertPlacement::kLinear, {"--tp-size", "2"}},
      {2, 2, ExpertPlacement::kRoundRobin, {"--ep-size", "2", "--tp-size", "2", "--expert-placement", "round_robin"}},
      {2, 1, ExpertPlacement::kLinear, {"--ep-size", "2", "--redundant-experts", "2"}, 2},  // EPLB replicas
  };
  int i = 0;
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    const MoeLayer::Result full = direct_forward(m, {}, dtype, in, M);
    for (const Layout& lay : layouts) {
      std::vector<MoeLayer::Result> partials;
      for (int e = 0; e < lay.ep; ++e) {
        for (int t = 0; t < lay.tp; ++t) {
          ParallelLayout p;
          p.ep_size = lay.ep;
          p.ep_rank = e;
          p.tp_size = lay.tp;
          p.tp_rank = t;
          p.placement = lay.placement;
          p.redundant_experts = lay.redundant;
          partials.push_back(direct_forward(m, p, dtype, in, M));
        }
      }
      MoeLayer::Result want = partials[0];
      std::vector<double> got_full(static_cast<std::size_t>(M * H)), want_full(got_full.size());
      for (Index x = 0; x < M * H; ++x) {
        float sum = 0.0f;
        for (const MoeLayer::Result& r : partials) {
          sum += dtype == DType::kF32 ? reinterpret_cast<const float*>(r.output.bytes.data())[x]
                                      : to_float(reinterpret_cast<const bfloat16*>(r.output.bytes.data())[x]);
        }
        if (dtype == DType::kF32) {
          reinterpret_cast<float*>(want.output.bytes.data())[x] = sum;
          want_full[x] = reinterpret_cast<const float*>(full.output.bytes.data())[x];
        } else {
          reinterpret_cast<bfloat16*>(want.output.bytes.data())[x] = from_float<bfloat16>(sum);
          want_full[x] = to_float(reinterpret_cast<const bfloat16*>(full.output.bytes.data())[x]);
        }
        got_full[x] = dtype == DType::kF32 ? reinterpret_cast<const float*>(want.output.bytes.data())[x]
                                           : to_float(reinterpret_cast<const bfloat16*>(want.output.bytes.data())[x]);
      }
      const std::string out_path = m.dir + "/all" + std::to_string(i++) + ".safetensors";
      const std::vector<std::string> args = base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", out_path,
                                                                                            "--dtype", std::string(to_string(dtype))} +
                                            lay.flags;
      const ToolResult r = tool(args);
      ASSERT_EQ(r.rc, 0) << describe(args, r);
      SCOPED_TRACE(describe(args, r));
      EXPECT_NE(r.out.find("ranks in this process, all-reduced"), std::string::npos) << r.out;
      expect_output_file(out_path, want, M, H, m.spec.top_k);
      // Against the single-rank forward: f32 sums in another order; bf16 one extra rounding per partial.
      const double tol = dtype == DType::kF32 ? 1e-5 : 2e-2;
      EXPECT_TRUE(testing::all_close(got_full, want_full, {1e-6, tol}));
    }
  }
}

// --ep-dispatch all-to-all / low-latency: the tokens are shared out to the EP ranks and their
// rows dispatched to the experts' ranks; given the router logits, the file is the single-rank
// run's, byte for byte. The dispatch needs every rank in the process.
TEST(Run, AllToAllDispatchWritesTheSingleRankBytes) {
  const Model m = write_model("run_all_to_all", spec_of("Qwen2MoeForCausalLM"));  // a gated shared expert
  const Index M = 9, H = m.spec.hidden, E = m.spec.num_experts;
  const std::string in_path = m.dir + "/in.safetensors", single = m.dir + "/single.safetensors";
  write_inputs(in_path, M, H, 12, E);
  const std::vector<std::string> base = base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--dtype", "bf16"};
  const ToolResult ref = tool(base + std::vector<std::string>{"--output", single});
  ASSERT_EQ(ref.rc, 0) << ref.err;
  int i = 0;
  for (const char* dispatch : {"all-to-all", "low-latency"}) {
    for (const std::vector<std::string>& layout :
         {std::vector<std::string>{"--ep-size", "2"}, std::vector<std::string>{"--ep-size", "2", "--redundant-experts", "2"}}) {
      const std::string out_path = m.dir + "/a2a" + std::to_string(i++) + ".safetensors";
      const std::vector<std::string> args = base + layout + std::vector<std::string>{"--ep-dispatch", dispatch, "--output", out_path};
      const ToolResult r = tool(args);
      ASSERT_EQ(r.rc, 0) << describe(args, r);
      EXPECT_NE(r.out.find("tokens dispatched all-to-all"), std::string::npos) << r.out;
      EXPECT_EQ(testing::hf::read_text(out_path), testing::hf::read_text(single)) << describe(args, r);
    }
  }
  // One rank's share alone is refused; so are an unknown dispatch, more ranks than a group holds,
  // and a rank past its size.
  const std::string out_path = m.dir + "/refused.safetensors";
  const std::vector<std::vector<std::string>> refused = {
      {"--ep-size", "2", "--ep-rank", "1", "--ep-dispatch", "all-to-all"},
      {"--ep-size", "2", "--ep-dispatch", "all_to_all"},
      {"--ep-dispatch", "low-latency"},
      {"--ep-size", "1024", "--tp-size", "2"},
      {"--ep-size", "2", "--ep-rank", "2"},
  };
  for (const auto& flags : refused) {
    const std::vector<std::string> args = base + flags + std::vector<std::string>{"--output", out_path};
    const ToolResult r = tool(args);
    EXPECT_EQ(r.rc, 2) << describe(args, r);
    EXPECT_NE(r.err.find(flags[flags.size() - 2]), std::string::npos) << describe(args, r);  // names the last flag
    EXPECT_FALSE(fs::exists(out_path));
  }
}

// `moe run --launch local`: the real executable starts one process per rank; their partials meet
// through files and rank 0 writes the full output, the same bytes as the in-process ranks give
// (the same rank-ordered all-reduce). A rank that fails stops the run: exit 1, OUT untouched, and
// no rendezvous directory left behind.
struct Spawned {
  int rc = -1;
  std::string out, err;
};
Spawned spawn_tool(const std::vector<std::string>& args, const std::string& tmpdir) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  const std::string exe = std::string(srcdir ? srcdir : ".") + "/" + (workspace ? workspace : "moe") + "/cli/moe";
  const std::string out_path = tmpdir + "/stdout.txt", err_path = tmpdir + "/stderr.txt";
  std::vector<std::string> argv_s = {exe};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string tmp_env = "TMPDIR=" + tmpdir;
  std::vector<std::string> env_s = {tmp_env, "OMP_NUM_THREADS=1"};
  std::vector<char*> env;
  for (std::string& e : env_s) env.push_back(e.data());
  env.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600), e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(o, 1);
    ::dup2(e, 2);
    ::execve(exe.c_str(), argv.data(), env.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  Spawned r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = testing::hf::read_text(out_path);
  r.err = testing::hf::read_text(err_path);
  fs::remove(out_path);
  fs::remove(err_path);
  return r;
}

TEST(Run, LaunchLocalStartsOneProcessPerRank) {
  const Model m = write_model("run_launch", spec_of("Qwen2MoeForCausalLM"));
  const Index M = 6, H = m.spec.hidden;
  const std::string in_path = m.dir + "/in.safetensors";
  write_inputs(in_path, M, H, 8);
  const std::string tmpdir = m.dir + "/tmp";
  fs::create_directories(tmpdir);
  const std::vector<std::string> layout = {"--ep-size", "2", "--tp-size", "2", "--dtype", "bf16", "--backend", "cpu"};
  const std::string in_process = m.dir + "/in_process.safetensors", launched = m.dir + "/launched.safetensors";
  const std::vector<std::string> base = base_args("run", m) + std::vector<std::string>{"--inputs", in_path} + layout;
  const ToolResult ref = tool(base + std::vector<std::string>{"--output", in_process});
  ASSERT_EQ(ref.rc, 0) << ref.err;
  const Spawned r = spawn_tool(base + std::vector<std::string>{"--output", launched, "--launch", "local"}, tmpdir);
  ASSERT_EQ(r.rc, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("ranks in one process each, all-reduced"), std::string::npos) << r.out;
  EXPECT_EQ(testing::hf::read_text(launched), testing::hf::read_text(in_process));
  EXPECT_TRUE(fs::is_empty(tmpdir)) << "a rendezvous directory was left in " << tmpdir;
  // The all-to-all dispatch over processes: each rank its share of the tokens, their rows sent
  // through the rendezvous files, rank 0 writing the gathered result: the in-process bytes.
  for (const char* dispatch : {"all-to-all", "low-latency"}) {
    const std::vector<std::string> a2a = base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--ep-size", "2",
                                                                                        "--dtype", "bf16", "--backend", "cpu",
                                                                                        "--ep-dispatch", dispatch};
    const std::string here = m.dir + "/a2a_in_process.safetensors", there = m.dir + "/a2a_launched.safetensors";
    const ToolResult one = tool(a2a + std::vector<std::string>{"--output", here});
    ASSERT_EQ(one.rc, 0) << one.err;
    const Spawned many = spawn_tool(a2a + std::vector<std::string>{"--output", there, "--launch", "local"}, tmpdir);
    ASSERT_EQ(many.rc, 0) << many.out << many.err;
    EXPECT_NE(many.out.find("ranks in one process each, tokens dispatched all-to-all"), std::string::npos) << many.out;
    EXPECT_EQ(testing::hf::read_text(there), testing::hf::read_text(here)) << dispatch;
    EXPECT_TRUE(fs::is_empty(tmpdir));
  }

  // A layout every rank refuses (tp_size 3 does not divide the intermediate size): exit 1, the
  // earlier output untouched, nothing left behind.
  const std::string before = testing::hf::read_text(launched);
  const Spawned bad = spawn_tool(base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", launched, "--tp-size", "3",
                                                                             "--backend", "cpu", "--launch", "local"},
                                 tmpdir);
  EXPECT_EQ(bad.rc, 1) << bad.out << bad.err;
  EXPECT_NE(bad.err.find("tp_size"), std::string::npos) << bad.err;
  EXPECT_EQ(testing::hf::read_text(launched), before);
  EXPECT_TRUE(fs::is_empty(tmpdir));
  // --launch is for the executable and a multi-rank run only.
  EXPECT_EQ(tool(base + std::vector<std::string>{"--output", launched, "--launch", "local"}).rc, 2);
  EXPECT_EQ(tool(base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", launched, "--launch", "local"}).rc, 2);
  EXPECT_EQ(tool(base + std::vector<std::string>{"--output", launched, "--launch", "remote"}).rc, 2);
}

TEST(Run, RouterLogitsAndBf16Inputs) {
  const Model m = write_model("run_logits", spec_of("DeepseekV3ForCausalLM"));
  const Index M = 7, H = m.spec.hidden, E = m.spec.num_experts;
  for (bool bf16 : {false, true}) {
    SCOPED_TRACE(bf16 ? "bf16 hidden_states" : "f32 hidden_states");
    const std::string in_path = m.dir + "/in.safetensors", out_path = m.dir + "/out.safetensors";
    const Inputs in = write_inputs(in_path, M, H, 5, E, bf16);
    const std::vector<std::string> args =
        base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", out_path, "--dtype", "f32"};
    const ToolResult r = tool(args);
    ASSERT_EQ(r.rc, 0) << describe(args, r);
    expect_output_file(out_path, direct_forward(m, {}, DType::kF32, in, M), M, H, m.spec.top_k);
  }
}

// A Hugging Face index (model.safetensors.index.json) in `dir` with this weight_map; its path.
std::string write_index(const std::string& dir, const io::Json& weight_map) {
  io::Json index = io::Json::object();
  index.set("weight_map", weight_map);
  const std::string path = dir + "/model.safetensors.index.json";
  testing::hf::write_text(path, index.dump());
  return path;
}

// Weights given as two --weights files, or as a Hugging Face index.
TEST(Run, ShardedWeights) {
  const Model m = write_model("run_sharded", spec_of("MixtralForCausalLM"));
  const Index M = 4, H = m.spec.hidden;
  io::Json weight_map = io::Json::object();
  std::vector<std::string> shards;
  for (int shard = 0; shard < 2; ++shard) {
    const std::string name = "model-0000" + std::to_string(shard + 1) + "-of-00002.safetensors";
    shards.push_back(m.dir + "/" + name);
    ASSERT_TRUE(testing::hf::rewrite_safetensors(m.weights, shards.back(), [&](testing::hf::EditableTensor& t) {
                  t.drop = (t.name.find("experts.") != std::string::npos) != (shard == 1);
                  if (!t.drop) weight_map.set(t.name, name);
                }).is_ok());
  }
  const std::string index_path = write_index(m.dir, weight_map);
  const std::string in_path = m.dir + "/in.safetensors";
  const Inputs in = write_inputs(in_path, M, H, 6);
  const MoeLayer::Result want = direct_forward(m, {}, DType::kBF16, in, M);
  const std::vector<std::string> common = {"run", "--model-config", m.config, "--layer-prefix", m.prefix, "--inputs", in_path};
  const std::vector<std::vector<std::string>> weights = {{"--weights", shards[0], "--weights", shards[1]},
                                                         {"--weights", index_path}};
  for (const auto& w : weights) {
    const std::string out_path = m.dir + "/out.safetensors";
    const std::vector<std::string> args = common + w + std::vector<std::string>{"--output", out_path};
    const ToolResult r = tool(args);
    ASSERT_EQ(r.rc, 0) << describe(args, r);
    expect_output_file(out_path, want, M, H, m.spec.top_k);
  }
}

// ---- info, bench --------------------------------------------------------------------------------

TEST(Info, DescribesArchitectureAndRouting) {
  struct Case {
    std::string arch;
    std::vector<std::string> flags;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"MixtralForCausalLM", {}, {"MixtralForCausalLM", "softmax_topk", "renormalize yes", "silu_and_mul", "block_sparse_moe"}},
      {"Qwen2MoeForCausalLM", {}, {"Qwen2MoeForCausalLM", "softmax_topk", "48 intermediate, sigmoid gate"}},
      {"Qwen3MoeForCausalLM", {"--tp-size", "2", "--tp-rank", "1"}, {"Qwen3MoeForCausalLM", "16 on this rank", "tp 1/2"}},
      {"DeepseekV2ForCausalLM", {}, {"DeepseekV2ForCausalLM", "grouped_softmax_topk", "renormalize no", "routed_scaling_factor 2.5", "groups 4, topk_group 2"}},
      {"DeepseekV3ForCausalLM", {"--ep-size", "2", "--ep-rank", "1", "--expert-placement", "round_robin"},
       {"DeepseekV3ForCausalLM", "grouped_sigmoid_topk", "correction bias", "ep 1/2 (round_robin), 4 local experts"}},
      {"GptOssForCausalLM", {"--dtype", "f32"}, {"GptOssForCausalLM", "swigluoai", "router bias", "expert biases     yes", "f32"}},
      {"Llama4ForCausalLM", {}, {"Llama4ForCausalLM", "llama4_top1_sigmoid", "router weight on input", "feed_forward"}},
      {"MixtralForCausalLM", {"--ep-size", "2", "--ep-rank", "1", "--redundant-experts", "2"},
       {"ep 1/2 (linear), 5 local experts", "eplb              10 physical experts (2 redundant)"}},
  };
  for (const Case& c : cases) {
    const Model m = write_model("info_" + c.arch, spec_of(c.arch));
    const std::vector<std::string> args = base_args("info", m) + c.flags;
    const ToolResult r = tool(args);
    ASSERT_EQ(r.rc, 0) << describe(args, r);
    EXPECT_EQ(r.err, "");
    for (const std::string& e : c.expect) EXPECT_NE(r.out.find(e), std::string::npos) << "lacks \"" << e << "\"\n" << r.out;
  }
}

// A block-scaled FP8 checkpoint (DeepSeek-V3's format) through the tool: `info` names the scheme,
// `run --dtype` is the output dtype and writes what the layer computes.
TEST(Run, Fp8BlockCheckpoint) {
  HfLayerSpec spec = spec_of("DeepseekV3ForCausalLM");
  spec.hidden = 128;
  spec.intermediate = 128;
  const testing::quantized::Fp8Model q = testing::quantized::write_fp8_model("tool", spec);
  const Model m{q.dir, q.fp8_config, q.fp8_weights, q.prefix, spec};
  const ToolResult info = tool(base_args("info", m));
  ASSERT_EQ(info.rc, 0) << describe(base_args("info", m), info);
  for (const char* e : {"fp8 e4m3 W8A8 [fp8], weight scales block 128x128", "weights fp8_block_128x128", "expert weights"}) {
    EXPECT_NE(info.out.find(e), std::string::npos) << "lacks \"" << e << "\"\n" << info.out;
  }
  const Index M = 4, H = spec.hidden;
  const std::string in_path = m.dir + "/in.safetensors";
  const Inputs in = write_inputs(in_path, M, H, 6);
  for (const std::string dtype : {"bf16", "f32"}) {
    const std::string out_path = m.dir + "/out_" + dtype + ".safetensors";
    const std::vector<std::string> args =
        base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", out_path, "--dtype", dtype};
    const ToolResult r = tool(args);
    ASSERT_EQ(r.rc, 0) << describe(args, r);
    SCOPED_TRACE(describe(args, r));
    expect_output_file(out_path, direct_forward(m, {}, dtype_named(dtype), in, M), M, H, spec.top_k);
  }
}

// A GPTQ act-order checkpoint through the tool: `info` names the scheme and the packed bytes,
// `run` writes what the layer computes in bf16, and `--dtype f32` is refused with the reason (the
// weight-only schemes take bf16 or f16 activations) with no output file written.
TEST(Run, GptqCheckpoint) {
  HfLayerSpec spec = spec_of("MixtralForCausalLM");
  spec.hidden = 128;
  spec.intermediate = 64;
  const testing::weight_only::Model q =
      testing::weight_only::write_model("tool_gptq", spec, {testing::weight_only::Kind::kGptq, 4, 32, false, true});
  const Model m{q.dir, q.config, q.weights, q.prefix, spec};
  const ToolResult info = tool(base_args("info", m));
  ASSERT_EQ(info.rc, 0) << describe(base_args("info", m), info);
  for (const char* e : {"int4 weight-only W4A16, act-order [gptq], weight scales group of 32", "weights w4a16", "expert weights"}) {
    EXPECT_NE(info.out.find(e), std::string::npos) << "lacks \"" << e << "\"\n" << info.out;
  }
  const Index M = 4, H = spec.hidden;
  const std::string in_path = m.dir + "/in.safetensors";
  const Inputs in = write_inputs(in_path, M, H, 7);
  const std::string out_path = m.dir + "/out.safetensors";
  std::vector<std::string> args = base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", out_path};
  const ToolResult r = tool(args);
  ASSERT_EQ(r.rc, 0) << describe(args, r);
  expect_output_file(out_path, direct_forward(m, {}, DType::kBF16, in, M), M, H, spec.top_k);
  const std::string f32_path = m.dir + "/out_f32.safetensors";
  args = base_args("run", m) + std::vector<std::string>{"--inputs", in_path, "--output", f32_path, "--dtype", "f32"};
  const ToolResult refused = tool(args);
  EXPECT_EQ(refused.rc, 1) << describe(args, refused);
  EXPECT_NE(refused.err.find("bf16 or f16"), std::string::npos) << describe(args, refused);
  EXPECT_FALSE(std::filesystem::exists(f32_path));
}

TEST(Bench, TinyCheckpoint) {
  const Model m = write_model("bench", spec_of("GptOssForCausalLM"));
  const std::vector<std::string> args = base_args("bench", m) + std::vector<std::string>{"--tokens", "4", "--iterations", "2"};
  const ToolResult r = tool(args);
  ASSERT_EQ(r.rc, 0) << describe(args, r);
  EXPECT_NE(r.out.find("bench GptOssForCausalLM: M=4, median of 2"), std::string::npos) << r.out;
  // Sizes without a rank: every rank in this process (the CPU, where the device layer is absent).
  const std::vector<std::string> group = args + std::vector<std::string>{"--ep-size", "2", "--tp-size", "2", "--backend", "cpu"};
  const ToolResult g = tool(group);
  ASSERT_EQ(g.rc, 0) << describe(group, g);
  EXPECT_NE(g.out.find("bench GptOssForCausalLM (ep 2 x tp 2 ranks in this process): M=4, median of 2"), std::string::npos) << g.out;
}

// ---- bad inputs ---------------------------------------------------------------------------------

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    m_ = write_model("bad", spec_of("Qwen2MoeForCausalLM"));
    in_ = m_.dir + "/in.safetensors";
    write_inputs(in_, 4, m_.spec.hidden, 8);
    out_dir_ = testing::hf::make_test_dir("tool_bad_out");
  }

  // Runs `args` (with "--output <fresh path>" appended when `with_output`) and checks: exit code
  // `rc`, a one-line message naming every part of `expect`, nothing on out, and no file in the
  // output directory.
  void expect_failure(std::vector<std::string> args, int rc, std::vector<std::string> expect, bool with_output = true) {
    const std::string out_path = out_dir_ + "/out" + std::to_string(n_++) + ".safetensors";
    if (with_output) args = args + std::vector<std::string>{"--output", out_path};
    const ToolResult r = tool(args);
    SCOPED_TRACE(describe(args, r));
    EXPECT_EQ(r.rc, rc);
    EXPECT_EQ(r.out, "");
    ASSERT_FALSE(r.err.empty());
    const std::size_t nl = r.err.find('\n');
    ASSERT_NE(nl, std::string::npos) << "the message ends with a newline";
    const std::string line = r.err.substr(0, nl);
    EXPECT_EQ(nl + 1, r.err.size()) << "exactly one line";
    if (rc == 2) {
      EXPECT_EQ(line.rfind("moe: ", 0), 0u);
      EXPECT_NE(line.find("moe help"), std::string::npos) << "usage errors point to `moe help`";
    } else {
      EXPECT_EQ(line.rfind("moe " + args[0] + ": ", 0), 0u);
    }
    for (const std::string& e : expect) EXPECT_NE(line.find(e), std::string::npos) << "message lacks \"" << e << "\"";
    EXPECT_FALSE(fs::exists(out_path)) << "output left behind";
    for (const auto& entry : fs::directory_iterator(out_dir_)) ADD_FAILURE() << "stray file " << entry.path();
  }

  std::vector<std::string> run_args() { return base_args("run", m_) + std::vector<std::string>{"--inputs", in_}; }

  Model m_;
  std::string in_, out_dir_;
  int n_ = 0;
};

TEST(Help, PrintsUsageAndExitsZero) {
  for (const char* h : {"help", "--help", "-h"}) {
    std::ostringstream out, err;
    EXPECT_EQ(moe::cli::run_tool({h}, out, err), 0);
    EXPECT_EQ(out.str().rfind("usage:", 0), 0u) << out.str();
    EXPECT_EQ(err.str(), "");
  }
}

TEST_F(BadInputTest, UsageErrorsExitTwo) {
  expect_failure({}, 2, {"missing command"}, false);
  expect_failure({"frobnicate"}, 2, {"unknown command", "frobnicate"}, false);
  expect_failure({"--verbose"}, 2, {"--verbose"}, false);
  expect_failure(run_args() + std::vector<std::string>{"--bogus", "1"}, 2, {"unknown option --bogus"});
  expect_failure(run_args() + std::vector<std::string>{"--output"}, 2, {"--output", "missing value"}, false);
  expect_failure(run_args() + std::vector<std::string>{"--backend", "tpu"}, 2, {"--backend", "tpu"});
  expect_failure(run_args() + std::vector<std::string>{"--dtype", "f64"}, 2, {"--dtype", "f64"});
  expect_failure(run_args() + std::vector<std::string>{"--expert-placement", "random"}, 2, {"--expert-placement", "random"});
  expect_failure(run_args() + std::vector<std::string>{"--ep-size", "0"}, 2, {"--ep-size"});
  expect_failure(run_args() + std::vector<std::string>{"--ep-rank", "-1"}, 2, {"--ep-rank"});
  expect_failure(run_args() + std::vector<std::string>{"--tp-size", "2x"}, 2, {"--tp-size", "2x"});
  expect_failure(run_args() + std::vector<std::string>{"--tp-rank", ""}, 2, {"--tp-rank"});
  expect_failure(run_args() + std::vector<std::string>{"--tokens", "abc"}, 2, {"--tokens"});
  expect_failure(run_args() + std::vector<std::string>{"--iterations", "0"}, 2, {"--iterations"});
  // Values past int (or past long) are errors, never narrowed: 4294967298 is 2 mod 2^32.
  expect_failure(run_args() + std::vector<std::string>{"--ep-size", "4294967298", "--ep-rank", "4294967297"}, 2,
                 {"--ep-size", "4294967298"});
  expect_failure(run_args() + std::vector<std::string>{"--tp-rank", "4294967297"}, 2, {"--tp-rank", "4294967297"});
  expect_failure(run_args() + std::vector<std::string>{"--tokens", "99999999999999999999"}, 2,
                 {"--tokens", "99999999999999999999"});
  expect_failure(run_args() + std::vector<std::string>{"--tokens", "1000000000000"}, 2, {"--tokens", "[0, 16777216]"});
  expect_failure({"run", "--weights", m_.weights, "--layer-prefix", m_.prefix, "--inputs", in_}, 2, {"--model-config"});
  expect_failure({"run", "--model-config", m_.config, "--layer-prefix", m_.prefix, "--inputs", in_}, 2, {"--weights"});
  expect_failure({"run", "--model-config", m_.config, "--weights", m_.weights, "--inputs", in_}, 2, {"--layer-prefix"});
  expect_failure(base_args("run", m_), 2, {"--inputs"});
  expect_failure(run_args(), 2, {"--output"}, false);
  expect_failure({"info", "--weights", m_.weights, "--layer-prefix", m_.prefix}, 2, {"--model-config"}, false);
  expect_failure({"bench", "--tokens", "4"}, 2, {"--model-config"}, false);
  expect_failure({"bench", "--shape", "mixtral_8x7b", "--tokens", "-1"}, 2, {"--tokens"}, false);
}

// Sizes that would need more memory than any machine has are refused before allocating.
TEST_F(BadInputTest, HugeBenchIsRefusedBeforeAllocating) {
  expect_failure({"bench", "--shape", "deepseek_v3", "--tokens", "16777216", "--iterations", "1", "--backend", "cpu"}, 1,
                 {"--tokens 16777216", "MiB of host memory"}, false);
}

TEST_F(BadInputTest, FailedCommandsExitOne) {
  expect_failure(run_args() + std::vector<std::string>{"--backend", "cuda"}, 1, {"cuda"});
  expect_failure(base_args("info", m_) + std::vector<std::string>{"--backend", "cuda"}, 1, {"cuda"}, false);
  expect_failure(base_args("bench", m_) + std::vector<std::string>{"--backend", "cuda"}, 1, {"cuda"}, false);
  expect_failure({"bench", "--shape", "qwen9_1t", "--backend", "cuda"}, 1, {"cuda"}, false);

  // Inputs: missing file, missing hidden_states, wrong width, wrong dtype, bad router_logits.
  const std::string absent = m_.dir + "/absent.safetensors";
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", absent}, 1, {absent});
  std::vector<float> v(4 * 65, 0.5f);
  const std::string no_hidden = m_.dir + "/no_hidden.safetensors";
  ASSERT_TRUE(io::write_safetensors(no_hidden, {{"hidden", DType::kF32, {4, 64}, v.data()}}).is_ok());
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", no_hidden}, 1, {no_hidden, "hidden_states"});
  const std::string wide = m_.dir + "/wide.safetensors";
  ASSERT_TRUE(io::write_safetensors(wide, {{"hidden_states", DType::kF32, {4, 65}, v.data()}}).is_ok());
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", wide}, 1, {wide, "hidden_states", "[4, 65]"});
  const std::string ints = m_.dir + "/ints.safetensors";
  ASSERT_TRUE(io::write_safetensors(ints, {{"hidden_states", DType::kI32, {4, 64}, v.data()}}).is_ok());
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", ints}, 1, {ints, "hidden_states", "i32"});
  const std::string vec = m_.dir + "/vec.safetensors";
  ASSERT_TRUE(io::write_safetensors(vec, {{"hidden_states", DType::kF32, {64}, v.data()}}).is_ok());
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", vec}, 1, {vec, "hidden_states"});
  const std::string bad_logits = m_.dir + "/bad_logits.safetensors";
  ASSERT_TRUE(io::write_safetensors(bad_logits, {{"hidden_states", DType::kF32, {4, 64}, v.data()},
                                                 {"router_logits", DType::kF32, {4, 7}, v.data()}})
                  .is_ok());
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", bad_logits}, 1, {"router_logits", "[4, 7]"});
  const std::string bf16_logits = m_.dir + "/bf16_logits.safetensors";
  ASSERT_TRUE(io::write_safetensors(bf16_logits, {{"hidden_states", DType::kF32, {4, 64}, v.data()},
                                                  {"router_logits", DType::kBF16, {4, 8}, v.data()}})
                  .is_ok());
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", bf16_logits}, 1, {"router_logits", "bf16"});
  const std::string not_st = m_.dir + "/not_safetensors.safetensors";
  testing::hf::write_text(not_st, "this is not a safetensors file");
  expect_failure(base_args("run", m_) + std::vector<std::string>{"--inputs", not_st}, 1, {not_st});

  // Model config and weights.
  const std::string no_config = m_.dir + "/absent.json";
  expect_failure({"run", "--model-config", no_config, "--weights", m_.weights, "--layer-prefix", m_.prefix, "--inputs", in_},
                 1, {no_config});
  const std::string bad_json = m_.dir + "/bad.json";
  testing::hf::write_text(bad_json, "{\"architectures\": [\"Qwen2MoeForCausalLM\"],");
  expect_failure({"run", "--model-config", bad_json, "--weights", m_.weights, "--layer-prefix", m_.prefix, "--inputs", in_},
                 1, {bad_json});
  const std::string unknown = m_.dir + "/unknown.json";
  testing::hf::write_text(unknown, "{\"architectures\": [\"FooForCausalLM\"]}");
  expect_failure({"info", "--model-config", unknown, "--weights", m_.weights, "--layer-prefix", m_.prefix}, 1,
                 {unknown, "FooForCausalLM"}, false);
  expect_failure({"run", "--model-config", m_.config, "--weights", absent, "--layer-prefix", m_.prefix, "--inputs", in_}, 1,
                 {absent});
  const std::string truncated = m_.dir + "/truncated.safetensors";
  fs::copy_file(m_.weights, truncated, fs::copy_options::overwrite_existing);
  fs::resize_file(truncated, fs::file_size(truncated) / 2);
  expect_failure({"run", "--model-config", m_.config, "--weights", truncated, "--layer-prefix", m_.prefix, "--inputs", in_},
                 1, {truncated});
  expect_failure({"run", "--model-config", m_.config, "--weights", m_.weights, "--layer-prefix", "model.layers.9", "--inputs",
                  in_},
                 1, {"model.layers.9"});

  // Layouts the checkpoint cannot take.
  expect_failure(run_args() + std::vector<std::string>{"--tp-size", "3"}, 1, {"tp_size"});
  expect_failure(run_args() + std::vector<std::string>{"--tp-size", "2", "--tp-rank", "2"}, 2, {"--tp-rank", "below --ep-size 1 and --tp-size 2"});
  expect_failure(run_args() + std::vector<std::string>{"--ep-size", "2", "--ep-rank", "2"}, 2, {"--ep-rank", "below --ep-size 2"});
  expect_failure(run_args() + std::vector<std::string>{"--ep-size", "1024", "--tp-size", "1024"}, 2, {"--ep-size x --tp-size", "at most 1024"});
  expect_failure(run_args() + std::vector<std::string>{"--ep-size", "9"}, 1, {"ep_size"});
  expect_failure(base_args("info", m_) + std::vector<std::string>{"--tp-size", "3"}, 1, {"tp_size"}, false);
  expect_failure(base_args("bench", m_) + std::vector<std::string>{"--ep-size", "2", "--ep-rank", "5"}, 2, {"--ep-rank", "got 5"}, false);

  // The output cannot be written.
  const std::vector<std::string> args =
      run_args() + std::vector<std::string>{"--output", out_dir_ + "/no/such/dir/out.safetensors"};
  const ToolResult r = tool(args);
  EXPECT_EQ(r.rc, 1) << describe(args, r);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(out_dir_ + "/no/such/dir/out.safetensors"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::is_empty(out_dir_));
}

// An unknown --shape is refused before anything is allocated (exit 1: it is detected by the
// bench command, not the option parser).
TEST_F(BadInputTest, UnknownBenchShape) {
  expect_failure({"bench", "--shape", "qwen9_1t", "--tokens", "1", "--iterations", "1"}, 1, {"--shape", "qwen9_1t"}, false);
}

// A failing run over an existing output file (from an earlier run) never leaves a partial file
// there: the path holds either nothing or the old file, byte for byte (the tool writes through a
// temporary + rename), and no temporary is left behind.
TEST_F(BadInputTest, FailedRunLeavesNoPartialOutput) {
  const std::string out_path = m_.dir + "/previous.safetensors";
  const ToolResult ok = tool(run_args() + std::vector<std::string>{"--output", out_path});
  ASSERT_EQ(ok.rc, 0) << ok.err;
  const std::string before = testing::hf::read_text(out_path);
  std::vector<float> v(4 * 65, 0.5f);
  const std::string wide = m_.dir + "/wide.safetensors";
  ASSERT_TRUE(io::write_safetensors(wide, {{"hidden_states", DType::kF32, {4, 65}, v.data()}}).is_ok());
  const ToolResult bad =
      tool(base_args("run", m_) + std::vector<std::string>{"--inputs", wide, "--output", out_path});
  EXPECT_EQ(bad.rc, 1);
  if (fs::exists(out_path)) {
    EXPECT_EQ(testing::hf::read_text(out_path), before);
  }
  for (const auto& e : fs::directory_iterator(m_.dir)) {
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << "temporary left behind: " << e.path();
  }
}

// A failed `moe run` leaves OUT as it found it, byte for byte: the tool deletes nothing but its
// own temporary file (a caller tells a failed run by its exit code, not by a missing file).
TEST_F(BadInputTest, FailedRunLeavesOutputUntouched) {
  const std::string out_path = m_.dir + "/earlier.safetensors";
  ASSERT_EQ(tool(run_args() + std::vector<std::string>{"--output", out_path}).rc, 0);
  const std::string before = testing::hf::read_text(out_path);
  for (const std::vector<std::string>& failing :
       {run_args() + std::vector<std::string>{"--backend", "cuda"},
        base_args("run", m_) + std::vector<std::string>{"--inputs", m_.dir + "/absent.safetensors"},
        run_args() + std::vector<std::string>{"--tp-size", "3"}}) {
    const std::vector<std::string> args = failing + std::vector<std::string>{"--output", out_path};
    const ToolResult r = tool(args);
    EXPECT_EQ(r.rc, 1) << describe(args, r);
    ASSERT_TRUE(fs::exists(out_path)) << describe(args, r);
    EXPECT_EQ(testing::hf::read_text(out_path), before) << describe(args, r);
  }
}

// --output naming a file the run reads is refused before anything is written, however it is
// spelled (another path to it, a symbolic link, a hard link), and so is a directory.
TEST_F(BadInputTest, OutputAliasingAnInputIsRefused) {
  const std::string config_before = testing::hf::read_text(m_.config);
  const std::string inputs_before = testing::hf::read_text(in_);
  const std::string weights_before = testing::hf::read_text(m_.weights);
  const std::string link = m_.dir + "/link.safetensors", hard = m_.dir + "/hard.safetensors";
  fs::create_symlink(in_, link);
  fs::create_hard_link(m_.weights, hard);
  const std::string respelled = m_.dir + "/./../" + fs::path(m_.dir).filename().string() + "/in.safetensors";
  struct Case {
    std::string out, expect;
  };
  for (const Case& c : {Case{in_, "--inputs"}, Case{respelled, "--inputs"}, Case{link, "--inputs"},
                        Case{m_.config, "--model-config"}, Case{m_.weights, "--weights file"},
                        Case{hard, "--weights file"}}) {
    const std::vector<std::string> args = run_args() + std::vector<std::string>{"--output", c.out};
    const ToolResult r = tool(args);
    EXPECT_EQ(r.rc, 1) << describe(args, r);
    EXPECT_NE(r.err.find("--output " + c.out + ": is the same file as " + c.expect), std::string::npos)
        << describe(args, r);
  }
  EXPECT_EQ(testing::hf::read_text(m_.config), config_before);
  EXPECT_EQ(testing::hf::read_text(in_), inputs_before);
  EXPECT_EQ(testing::hf::read_text(m_.weights), weights_before);
  const std::string dir_out = m_.dir + "/a_directory";
  fs::create_directories(dir_out);
  const ToolResult r = tool(run_args() + std::vector<std::string>{"--output", dir_out});
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("expected a regular file or a new path, found a directory"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::is_directory(dir_out));
}

// A shard named by an index is an input too.
TEST(Run, OutputAliasingAnIndexShardIsRefused) {
  const Model m = write_model("run_alias_shard", spec_of("MixtralForCausalLM"));
  io::Json weight_map = io::Json::object();
  const std::string shard = m.dir + "/model-00001-of-00001.safetensors";
  ASSERT_TRUE(testing::hf::rewrite_safetensors(m.weights, shard, [&](testing::hf::EditableTensor& t) {
                weight_map.set(t.name, "model-00001-of-00001.safetensors");
              }).is_ok());
  const std::string index_path = write_index(m.dir, weight_map);
  const std::string in_path = m.dir + "/in.safetensors";
  write_inputs(in_path, 2, m.spec.hidden, 3);
  const std::string before = testing::hf::read_text(shard);
  const std::vector<std::string> args = {"run", "--model-config", m.config, "--weights", index_path, "--layer-prefix",
                                         m.prefix, "--inputs", in_path, "--output", shard};
  const ToolResult r = tool(args);
  EXPECT_EQ(r.rc, 1) << describe(args, r);
  EXPECT_NE(r.err.find("is the same file as --weights file " + shard), std::string::npos) << describe(args, r);
  EXPECT_EQ(testing::hf::read_text(shard), before);
}

}  // namespace
}  // namespace moe
