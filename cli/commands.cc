#include "cli/commands.h"

#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <new>
#include <cmath>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <optional>
#include <random>
#include <sstream>

#include "moe/io/safetensors.h"
#include "moe/layer/cuda_registry.h"
#include "moe/layer/device_layer.h"
#include "moe/layer/moe_layer.h"
#include "moe/layer/rank_group_layer.h"
#include "moe/parallel/file_group.h"
#include "cli/launch.h"

namespace moe::cli {
namespace {

constexpr const char* kUsage =
    "usage:\n"
    "  moe run   --model-config CONFIG.json --weights FILE [--weights FILE ...] --layer-prefix PREFIX\n"
    "            --inputs IN.safetensors --output OUT.safetensors [--backend cpu|cuda] [--dtype f32|bf16|f16]\n"
    "            [--ep-size N --ep-rank R --expert-placement linear|round_robin] [--tp-size N --tp-rank R]\n"
    "            [--redundant-experts N] (EPLB replicas, linear placement) [--launch local]\n"
    "            [--ep-dispatch partial-sums|all-to-all|low-latency] (how EP ranks share tokens)\n"
    "            (sizes without ranks: every rank in this process, one full output; with --launch local: one\n"
    "            process per rank, one GPU each on cuda, one full output; with a rank: its partial sum)\n"
    "  moe info  --model-config CONFIG.json --weights FILE ... --layer-prefix PREFIX [layout options]\n"
    "  moe bench (--model-config CONFIG.json --weights FILE ... --layer-prefix PREFIX | --shape NAME)\n"
    "            [--tokens M] [--iterations N] [--dtype f32|bf16|f16] [--backend cpu|cuda] [layout options]\n"
    "  moe bench --model-config CONFIG.json --weights random [--tokens M] [--shared-experts fused|apart]\n"
    "            (cuda: the device layer with random weights generated on the GPU)\n"
    "--backend defaults to cuda when a GPU (sm_90+) is present, else cpu.\n"
    "            shapes: qwen3_30b_a3b, gpt_oss_120b, mixtral_8x7b, deepseek_v3\n"
    "IN holds hidden_states [M, H] and optionally router_logits [M, E] (f32, final logits).\n"
    "OUT receives output [M, H], topk_ids [M, top_k] (i32, global ids), topk_weights [M, top_k] (f32).\n";

enum class Backend { kCpu, kCuda };
std::string_view to_string(Backend b) { return b == Backend::kCuda ? "cuda" : "cpu"; }

// The parsed command line: every choice flag is an enum from here on (parsed once, in parse_args).
struct Options {
  std::string command;
  std::string model_config, layer_prefix, inputs, output, shape;
  std::optional<Backend> backend;  // defaulted in parse_args
  DType dtype = DType::kBF16;
  ExpertPlacement placement = ExpertPlacement::kLinear;
  bool fuse_shared_experts = true;  // device layer: fused as extra experts, or apart on a second stream
  bool random_weights = false;      // --weights random
  std::vector<std::string> weights;
  int ep_size = 1, ep_rank = 0, tp_size = 1, tp_rank = 0;
  bool rank_given = false;  // --ep-rank or --tp-rank: compute that rank's partial only
  long redundant_experts = 0;
  layer::EpDispatch dispatch = layer::EpDispatch::kPartialSums;
  bool launch = false;     // --launch local: one process per rank (cli/launch.h)
  std::string rendezvous;  // set by --launch for its ranks: the directory they add their outputs through
  long tokens = 64, iterations = 10;
};

// An integer flag value in [lo, hi]: digits only (strtol's overflow, signs of other flags and
// trailing text are errors), so nothing narrows silently on the way into an int.
Status parse_int(const std::string& flag, const std::string& value, long lo, long hi, long* out) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno == ERANGE || v < lo || v > hi) {
    return invalid_argument(flag, ": expected an integer in [", lo, ", ", hi, "], got \"", value, "\"");
  }
  *out = v;
  return Status::ok();
}

// Bounds of the integer flags: ranks and sizes fit an int, and --ep-size x --tp-size ranks fit
// one group (parse_args checks the product); --tokens bounds the host buffers the tool allocates
// (--tokens x hidden values), --iterations the time a benchmark may take.
constexpr long kMaxRanks = parallel::InProcessGroup::kMaxRanks;
constexpr long kMaxTokens = 1 << 24;
constexpr long kMaxIterations = 1 << 20;

// A choice flag: `value` must be one of the names; the error lists them.
template <class T, std::size_t N>
Status parse_choice(const std::string& flag, const std::string& value, const std::pair<const char*, T> (&choices)[N], T* out) {
  std::string names;  // "a, b or c"
  for (std::size_t i = 0; i < N; ++i) {
    if (value == choices[i].first) {
      *out = choices[i].second;
      return Status::ok();
    }
    names += (i == 0 ? "" : i + 1 == N ? " or " : ", ") + std::string(choices[i].first);
  }
  return invalid_argument(flag, ": expected ", names, ", got ", value);
}

Status parse_args(const std::vector<std::string>& args, Options* o) {
  if (args.empty()) return invalid_argument("missing command (run, info, bench or help)");
  o->command = args[0];
  if (o->command != "run" && o->command != "info" && o->command != "bench") {
    return invalid_argument("unknown command \"", o->command, "\" (run, info or bench)");
  }
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (i + 1 >= args.size()) return invalid_argument(flag, ": missing value");
    const std::string& v = args[++i];
    long n = 0;
    if (flag == "--model-config") o->model_config = v;
    else if (flag == "--weights") o->weights.push_back(v);
    else if (flag == "--layer-prefix") o->layer_prefix = v;
    else if (flag == "--inputs") o->inputs = v;
    else if (flag == "--output") o->output = v;
    else if (flag == "--backend") {
      Backend b = Backend::kCpu;
      MOE_RETURN_IF_ERROR(parse_choice(flag, v, {{"cpu", Backend::kCpu}, {"cuda", Backend::kCuda}}, &b));
      o->backend = b;
    } else if (flag == "--dtype") {
      MOE_RETURN_IF_ERROR(parse_choice(flag, v, {{"f32", DType::kF32}, {"bf16", DType::kBF16}, {"f16", DType::kF16}}, &o->dtype));
    } else if (flag == "--expert-placement") {
      MOE_RETURN_IF_ERROR(parse_choice(
          flag, v, {{"linear", ExpertPlacement::kLinear}, {"round_robin", ExpertPlacement::kRoundRobin}}, &o->placement));
    } else if (flag == "--shape") o->shape = v;
    else if (flag == "--shared-experts") {
      MOE_RETURN_IF_ERROR(parse_choice(flag, v, {{"fused", true}, {"apart", false}}, &o->fuse_shared_experts));
    }
    else if (flag == "--ep-size") { MOE_RETURN_IF_ERROR(parse_int(flag, v, 1, kMaxRanks, &n)); o->ep_size = static_cast<int>(n); }
    else if (flag == "--ep-rank") { MOE_RETURN_IF_ERROR(parse_int(flag, v, 0, kMaxRanks - 1, &n)); o->ep_rank = static_cast<int>(n); o->rank_given = true; }
    else if (flag == "--tp-size") { MOE_RETURN_IF_ERROR(parse_int(flag, v, 1, kMaxRanks, &n)); o->tp_size = static_cast<int>(n); }
    else if (flag == "--tp-rank") { MOE_RETURN_IF_ERROR(parse_int(flag, v, 0, kMaxRanks - 1, &n)); o->tp_rank = static_cast<int>(n); o->rank_given = true; }
    else if (flag == "--launch") {
      if (v != "local") return invalid_argument("--launch: expected local (one process per rank on this machine), got ", v);
      o->launch = true;
    }
    else if (flag == "--rendezvous") o->rendezvous = v;
    else if (flag == "--ep-dispatch") {
      MOE_RETURN_IF_ERROR(parse_choice(flag, v,
                                       {{"partial-sums", layer::EpDispatch::kPartialSums},
                                        {"all-to-all", layer::EpDispatch::kAllToAll},
                                        {"low-latency", layer::EpDispatch::kAllToAllLowLatency}},
                                       &o->dispatch));
    }
    else if (flag == "--redundant-experts") { MOE_RETURN_IF_ERROR(parse_int(flag, v, 0, 1 << 16, &o->redundant_experts)); }
    else if (flag == "--tokens") { MOE_RETURN_IF_ERROR(parse_int(flag, v, 0, kMaxTokens, &o->tokens)); }
    else if (flag == "--iterations") { MOE_RETURN_IF_ERROR(parse_int(flag, v, 1, kMaxIterations, &o->iterations)); }
    else return invalid_argument("unknown option ", flag);
  }
  if (static_cast<long>(o->ep_size) * o->tp_size > kMaxRanks) {
    return invalid_argument("--ep-size x --tp-size: expected at most ", kMaxRanks, " ranks, got ", o->ep_size, " x ", o->tp_size);
  }
  if (o->ep_rank >= o->ep_size || o->tp_rank >= o->tp_size) {
    return invalid_argument("--ep-rank/--tp-rank: expected ranks below --ep-size ", o->ep_size, " and --tp-size ", o->tp_size,
                            ", got ", o->ep_rank, " and ", o->tp_rank);
  }
  if (o->dispatch != layer::EpDispatch::kPartialSums &&
      ((o->rank_given && o->rendezvous.empty()) || o->command == "info" || o->ep_size < 2 || !o->shape.empty() ||
       (o->weights.size() == 1 && o->weights[0] == "random"))) {
    return invalid_argument("--ep-dispatch: the all-to-all dispatches need --ep-size >= 2 and run every rank of a checkpoint's "
                            "layer (`moe run` or `moe bench` with no --ep-rank/--tp-rank, or `moe run --launch local`); one "
                            "rank's share means nothing alone");
  }
  if (!o->backend) o->backend = layer::cuda_device_available() ? Backend::kCuda : Backend::kCpu;  // cpu without a GPU
  o->random_weights = o->weights.size() == 1 && o->weights[0] == "random";
  const bool random_weights = o->random_weights;
  if (random_weights) {
    if (o->command != "bench" || o->backend != Backend::kCuda) {
      return invalid_argument("--weights random: only for `moe bench` on the cuda backend (weights generated on the GPU)");
    }
    if (o->ep_size != 1 || o->tp_size != 1 || o->redundant_experts != 0) {
      return invalid_argument("--weights random: one rank only (no --ep-size/--tp-size/--redundant-experts)");
    }
  }
  const bool from_checkpoint = !(o->command == "bench" && !o->shape.empty()) && !random_weights;
  if (random_weights && o->model_config.empty()) return invalid_argument("--model-config: required");
  if (from_checkpoint) {
    if (o->model_config.empty()) return invalid_argument("--model-config: required");
    if (o->weights.empty()) return invalid_argument("--weights: required (a .safetensors file or an index .json)");
    if (o->layer_prefix.empty()) return invalid_argument("--layer-prefix: required (e.g. model.layers.3)");
  }
  if (o->command == "run") {
    if (o->inputs.empty()) return invalid_argument("--inputs: required");
    if (o->output.empty()) return invalid_argument("--output: required");
  }
  if (o->launch && (o->command != "run" || o->ep_size * o->tp_size < 2 || o->rank_given || !o->rendezvous.empty())) {
    return invalid_argument("--launch: only for `moe run` with --ep-size/--tp-size of two or more ranks and no --ep-rank/--tp-rank");
  }
  if (!o->rendezvous.empty() && (o->command != "run" || !o->rank_given)) {
    return invalid_argument("--rendezvous: set by --launch for its ranks (with --ep-rank and --tp-rank)");
  }
  return Status::ok();
}


layer::ParallelLayout layout_of(const Options& o) {
  layer::ParallelLayout p;
  p.tp_size = o.tp_size;
  p.tp_rank = o.tp_rank;
  p.ep_size = o.ep_size;
  p.ep_rank = o.ep_rank;
  p.placement = o.placement;
  p.redundant_experts = o.redundant_experts;
  p.dispatch = o.dispatch;
  return p;
}

Status check_backend(const Options& o) {
  if (o.backend == Backend::kCuda && !layer::cuda_device_available()) {
    return unsupported("--backend cuda: no CUDA device with compute capability >= 9.0 is present (use --backend cpu)");
  }
  return Status::ok();
}

layer::MoeLayer::KernelFinder finder(const Options& o) {
  return o.backend == Backend::kCuda ? &layer::find_cuda_kernel : &layer::find_kernel;
}

Status load_layer(const Options& o, io::Checkpoint* ckpt, layer::MoeLayer* l, bool make_resident = true) {
  layer::ModelConfig config;
  MOE_RETURN_IF_ERROR(layer::load_model_config(o.model_config, &config));
  MOE_RETURN_IF_ERROR(io::Checkpoint::open(o.weights, ckpt));
  MOE_RETURN_IF_ERROR(layer::MoeLayer::load(config, layout_of(o), o.dtype, *ckpt, o.layer_prefix, l));
  // On the GPU the weights (codes and scales for quantized ones) are copied once and stay
  // resident; each forward copies activations.
  if (o.backend == Backend::kCuda && make_resident) {
    MOE_RETURN_IF_ERROR(layer::make_layer_resident(l));
  }
  return Status::ok();
}

// --output must be a new path or a regular file, and must not be any file the run reads (the
// config, the inputs, or any weights file, shards named by an index included): compared by
// device and inode, so another spelling, a link or a hard link to an input is caught too.
Status check_output(const Options& o, const io::Checkpoint& ckpt) {
  struct stat out_st;
  if (::stat(o.output.c_str(), &out_st) != 0) {
    if (errno == ENOENT) return Status::ok();  // a new file
    return invalid_argument("--output ", o.output, ": cannot stat: ", std::strerror(errno));
  }
  if (!S_ISREG(out_st.st_mode)) {
    return invalid_argument("--output ", o.output, ": expected a regular file or a new path, found ",
                            S_ISDIR(out_st.st_mode) ? "a directory" : "a special file");
  }
  std::vector<std::pair<std::string, std::string>> reads = {{"--model-config", o.model_config}, {"--inputs", o.inputs}};
  for (const io::SafetensorsFile& f : ckpt.files()) reads.emplace_back("--weights file", f.path());
  for (const auto& [role, path] : reads) {
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && st.st_dev == out_st.st_dev && st.st_ino == out_st.st_ino) {
      return invalid_argument("--output ", o.output, ": is the same file as ", role, " ", path,
                              "; refusing to overwrite an input");
    }
  }
  return Status::ok();
}

// `moe run` with --ep-size/--tp-size and no rank: every rank's shard in this process, the partial
// sums all-reduced into one full output (moe/layer/rank_group_layer.h).
bool all_ranks_in_process(const Options& o) { return o.ep_size * o.tp_size > 1 && !o.rank_given; }

// How long a launched rank waits for its peers' partial outputs: they load and run the same layer,
// and the launcher stops every rank when one fails, so this bounds only a stuck peer.
constexpr double kRendezvousSeconds = 3600.0;

Status command_run(const Options& o, std::ostream& out) {
  MOE_RETURN_IF_ERROR(check_backend(o));
  io::Checkpoint ckpt;
  layer::MoeLayer single;
  layer::RankGroupLayer group;
  const bool all_ranks = all_ranks_in_process(o);
  if (all_ranks) {
    layer::ModelConfig config;
    MOE_RETURN_IF_ERROR(layer::load_model_config(o.model_config, &config));
    MOE_RETURN_IF_ERROR(io::Checkpoint::open(o.weights, &ckpt));
    MOE_RETURN_IF_ERROR(layer::RankGroupLayer::load(config, layout_of(o), o.dtype, ckpt, o.layer_prefix, &group));
    for (int r = 0; r < group.size() && o.backend == Backend::kCuda; ++r) {
      MOE_RETURN_IF_ERROR(layer::make_layer_resident(group.mutable_rank(r)));
    }
  } else {
    MOE_RETURN_IF_ERROR(load_layer(o, &ckpt, &single));
  }
  const layer::MoeLayer& l = all_ranks ? group.rank(0) : single;
  // A rank started by --launch: its partial joins the others' through the rendezvous directory,
  // and rank 0 writes the full output.
  const int launched_rank = o.ep_rank * o.tp_size + o.tp_rank;
  std::unique_ptr<parallel::FileGroup> peers;
  if (!o.rendezvous.empty()) {
    MOE_RETURN_IF_ERROR(parallel::FileGroup::create(o.rendezvous, o.ep_size * o.tp_size, launched_rank, kRendezvousSeconds, &peers));
  }
  if (!peers || launched_rank == 0) MOE_RETURN_IF_ERROR(check_output(o, ckpt));
  io::SafetensorsFile in;
  MOE_RETURN_IF_ERROR(io::SafetensorsFile::open(o.inputs, &in));
  AnyTensor hidden;
  const Status hs = in.tensor("hidden_states", &hidden);
  if (!hs.is_ok()) return make_status(hs.code(), o.inputs, ": ", hs.message());
  std::optional<AnyTensor> logits;
  if (in.contains("router_logits")) {
    logits.emplace();
    MOE_RETURN_IF_ERROR(in.tensor("router_logits", &*logits));
  }
  layer::MoeLayer::Result r;
  const auto t0 = std::chrono::steady_clock::now();
  const bool dispatched = o.dispatch != layer::EpDispatch::kPartialSums;
  const Status fs = all_ranks                ? group.forward(hidden, logits, &r, {}, finder(o))
                    : peers && dispatched    ? layer::forward_share_all_to_all(*peers, l, hidden, logits, &r, {}, finder(o))
                                             : l.forward(hidden, logits, &r, {}, finder(o));
  if (!fs.is_ok()) return make_status(fs.code(), o.inputs, ": ", fs.message());
  if (peers && dispatched) {
    if (launched_rank != 0) return Status::ok();  // every rank has the gathered result; rank 0 writes it
  } else if (peers) {
    const Status reduced = layer::all_reduce_output(*peers, &r.output);
    if (!reduced.is_ok()) return make_status(reduced.code(), "rank ", launched_rank, ": ", reduced.message());
    if (launched_rank != 0) return Status::ok();  // rank 0 writes the output and reports
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const Index M = hidden.extents[0], k = l.config().top_k;
  std::vector<io::NamedTensor> outs = {
      {"output", r.output.dtype, r.output.shape, r.output.bytes.data()},
      {"topk_ids", DType::kI32, {M, k}, r.topk_ids.data()},
      {"topk_weights", DType::kF32, {M, k}, r.topk_weights.data()},
  };
  MOE_RETURN_IF_ERROR(io::write_safetensors(o.output, outs, {{"producer", "moe run"}}));
  double sum_abs = 0;
  for (Index i = 0; i < M * l.config().hidden; ++i) {
    const float v = r.output.dtype == DType::kF32 ? reinterpret_cast<const float*>(r.output.bytes.data())[i]
                    : r.output.dtype == DType::kBF16 ? to_float(reinterpret_cast<const bfloat16*>(r.output.bytes.data())[i])
                                                     : to_float(reinterpret_cast<const half*>(r.output.bytes.data())[i]);
    sum_abs += std::abs(v);
  }
  out << "moe run: " << l.config().architecture_name << ", " << M << " tokens, H=" << l.config().hidden
      << ", E=" << l.config().num_experts << " (top_k " << k << ", ";
  if (all_ranks) {
    out << "ep " << o.ep_size << " x tp " << o.tp_size << " ranks in this process, "
        << (o.dispatch == layer::EpDispatch::kPartialSums ? "all-reduced" : "tokens dispatched all-to-all");
  } else if (peers) {
    out << "ep " << o.ep_size << " x tp " << o.tp_size << " ranks in one process each, "
        << (dispatched ? "tokens dispatched all-to-all" : "all-reduced");
  } else {
    out << l.num_local_experts() << " local";
  }
  out << "), dtype " << to_string(l.dtype()) << ", " << to_string(*o.backend) << " backend: " << ms << " ms\n"
      << "wrote " << o.output << ": output [" << M << ", " << l.config().hidden << "] (mean |x| "
      << (M > 0 ? sum_abs / static_cast<double>(M * l.config().hidden) : 0.0) << "), topk_ids, topk_weights\n";
  return Status::ok();
}

Status command_info(const Options& o, std::ostream& out) {
  MOE_RETURN_IF_ERROR(check_backend(o));
  io::Checkpoint ckpt;
  layer::MoeLayer l;
  MOE_RETURN_IF_ERROR(load_layer(o, &ckpt, &l));
  out << l.describe() << "backend           " << to_string(*o.backend) << "\n";
  return Status::ok();
}

struct NamedShape {
  const char* name;
  Index E, H, I;
  int top_k;
};
constexpr NamedShape kShapes[] = {{"qwen3_30b_a3b", 128, 2048, 768, 8},
                                  {"gpt_oss_120b", 128, 2880, 2880, 4},
                                  {"mixtral_8x7b", 8, 4096, 14336, 2},
                                  {"deepseek_v3", 256, 7168, 2048, 8}};

// Times `iterations` calls of `once`, showing progress on stderr when a run is long.
template <class F>
Status time_calls(long iterations, std::ostream& err, F once, std::vector<double>* ms) {
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < iterations; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    MOE_RETURN_IF_ERROR(once());
    const auto t1 = std::chrono::steady_clock::now();
    ms->push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    if (std::chrono::duration<double>(t1 - start).count() > 2.0) {
      err << "\r  iteration " << (i + 1) << "/" << iterations << " (" << ms->back() << " ms)" << std::flush;
    }
  }
  if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > 2.0) err << "\n";
  return Status::ok();
}

void report(std::ostream& out, const std::string& what, Backend backend, Index M, Index H, Index I, int k,
            Index experts_hit, std::size_t elem, std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2] * 1e-3;
  const double flops = 6.0 * static_cast<double>(M) * k * H * I;
  const double bytes = static_cast<double>(experts_hit) * 3 * H * I * elem + 2.0 * M * H * elem;
  out << what << ": M=" << M << ", median of " << ms.size() << ": " << med * 1e6 << " us, " << flops / med * 1e-12
      << " TFLOP/s, " << bytes / med * 1e-9 << " GB/s (" << to_string(backend) << " backend"
      << (backend == Backend::kCuda ? ", weights resident, including host-device copies of the activations" : "") << ")\n";
}

// `moe bench` of a device layer: the layer forward and its experts stage alone, from CUDA graphs.
Status report_device_layer(std::ostream& out, const layer::ModelConfig& c, const layer::DeviceLayer& dev, Index M,
                           long iterations) {
  layer::DeviceLayer::Timing t;
  MOE_RETURN_IF_ERROR(dev.time_forward(M, static_cast<int>(std::min<long>(iterations, 1000)), &t));
  const double elem = dev.dtype() == DType::kF32 ? 4 : 2, H = static_cast<double>(c.hidden);
  const double I = static_cast<double>(c.intermediate), k = c.top_k;
  const double bytes = static_cast<double>(t.experts_hit) * 3 * H * I * elem + 2.0 * M * H * elem;
  out << "bench " << c.architecture_name << " (cuda backend, device layer, CUDA-graph replays, L2 flushed): M=" << M
      << ", layer " << t.layer_us << " us, experts stage alone " << t.experts_us << " us, layer adds "
      << t.layer_us - t.experts_us << " us (" << 100.0 * (t.layer_us - t.experts_us) / t.experts_us << "%); "
      << 6.0 * M * k * H * I / (t.layer_us * 1e-6) * 1e-12 << " TFLOP/s, " << bytes / (t.layer_us * 1e-6) * 1e-9
      << " GB/s of routed experts; shared experts "
      << (c.shared_intermediate > 0 ? (dev.shared_experts_fused() ? "fused" : "apart") : "none") << "\n";
  return Status::ok();
}

Status command_bench(const Options& o, std::ostream& out, std::ostream& err) {
  MOE_RETURN_IF_ERROR(check_backend(o));
  const DType dt = o.dtype;
  const Index M = o.tokens;
  std::mt19937 gen(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  if (!o.shape.empty()) {  // random weights of a named shape, routing not timed
    const NamedShape* s = nullptr;
    for (const auto& c : kShapes) if (o.shape == c.name) s = &c;
    if (!s) return invalid_argument("--shape: unknown \"", o.shape, "\" (qwen3_30b_a3b, gpt_oss_120b, mixtral_8x7b, deepseek_v3)");
    layer::ForwardFn fn = nullptr;
    MOE_RETURN_IF_ERROR(finder(o)({std::string(SiluAndMul::kName), dt, false}, &fn));
    const std::size_t elem = dt == DType::kF32 ? 4 : 2;
    // Host buffers: the weights, and --tokens rows of inputs and outputs. Checked before allocating.
    constexpr std::size_t kMaxBenchBytes = std::size_t{64} << 30;
    const std::size_t bytes = (static_cast<std::size_t>(s->E) * 3 * s->I * s->H + 2 * static_cast<std::size_t>(M) * s->H) * elem;
    if (bytes > kMaxBenchBytes) {
      return invalid_argument("--tokens ", M, ": the benchmark would need ", bytes >> 20, " MiB of host memory, more than the ",
                              kMaxBenchBytes >> 20, " MiB allowed");
    }
    layer::Buffer w13{dt, {s->E, 2 * s->I, s->H}, std::vector<std::byte>(s->E * 2 * s->I * s->H * elem)};
    layer::Buffer w2{dt, {s->E, s->H, s->I}, std::vector<std::byte>(s->E * s->H * s->I * elem)};
    layer::Buffer x{dt, {M, s->H}, std::vector<std::byte>(M * s->H * elem)}, y{dt, {M, s->H}, std::vector<std::byte>(M * s->H * elem)};
    err << "bench: generating " << (w13.bytes.size() + w2.bytes.size()) / (1 << 20) << " MiB of random weights\n";
    for (layer::Buffer* b : {&w13, &w2, &x}) {
      const Index n = static_cast<Index>(b->bytes.size() / elem);
      const float scale = b == &x ? 1.0f : 0.02f;
      for (Index i = 0; i < n; ++i) {
        const float v = scale * nd(gen);
        if (dt == DType::kF32) reinterpret_cast<float*>(b->bytes.data())[i] = v;
        else if (dt == DType::kBF16) reinterpret_cast<bfloat16*>(b->bytes.data())[i] = bfloat16(v);
        else reinterpret_cast<half*>(b->bytes.data())[i] = half(v);
      }
    }
    std::vector<std::int32_t> ids(M * s->top_k);
    std::vector<float> w(M * s->top_k, 1.0f / static_cast<float>(s->top_k));
    std::vector<int> perm(s->E);
    std::vector<bool> hit(s->E, false);
    for (Index m = 0; m < M; ++m) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), gen);
      for (int j = 0; j < s->top_k; ++j) hit[ids[m * s->top_k + j] = perm[j]] = true;
    }
    layer::ForwardRequest r;
    std::shared_ptr<void> d_w13, d_w2;
    if (o.backend == Backend::kCuda) {  // weights uploaded once, as a resident layer's
      MOE_RETURN_IF_ERROR(layer::upload_to_device(w13.bytes.data(), w13.bytes.size(), &d_w13));
      MOE_RETURN_IF_ERROR(layer::upload_to_device(w2.bytes.data(), w2.bytes.size(), &d_w2));
      w13.bytes.clear();
      w2.bytes.clear();
      r.weights_on_device = true;
    }
    r.hidden_states = x.tensor();
    r.topk_ids = AnyTensor{ids.data(), DType::kI32, {M, s->top_k}, {}};
    r.topk_weights = AnyTensor{w.data(), DType::kF32, {M, s->top_k}, {}};
    r.top_k = s->top_k;
    r.w13 = r.weights_on_device ? AnyTensor{d_w13.get(), dt, w13.shape, {}} : w13.tensor();
    r.w2 = r.weights_on_device ? AnyTensor{d_w2.get(), dt, w2.shape, {}} : w2.tensor();
    r.output = y.tensor();
    std::vector<double> ms;
    MOE_RETURN_IF_ERROR(fn(r));  // warm-up
    MOE_RETURN_IF_ERROR(time_calls(o.iterations, err, [&] { return fn(r); }, &ms));
    report(out, std::string("bench ") + s->name, *o.backend, M, s->H, s->I, s->top_k, std::count(hit.begin(), hit.end(), true), elem, ms);
    return Status::ok();
  }
  layer::DeviceLayer::Options dopt;
  dopt.max_tokens = std::max<Index>(M, 1);
  dopt.fuse_shared_experts = o.fuse_shared_experts;
  std::unique_ptr<layer::DeviceLayer> dev;
  if (o.random_weights) {  // model-sized layer without a checkpoint
    if (M < 1) return invalid_argument("--tokens: expected >= 1 for --weights random");
    layer::ModelConfig config;
    MOE_RETURN_IF_ERROR(layer::load_model_config(o.model_config, &config));
    MOE_RETURN_IF_ERROR(layer::DeviceLayer::create_random(config, dt, dopt, 7, &dev));
    return report_device_layer(out, config, *dev, M, o.iterations);
  }
  io::Checkpoint ckpt;
  if (all_ranks_in_process(o)) {  // every rank in this process (CPU, or the per-call CUDA path), all-reduced
    layer::ModelConfig config;
    MOE_RETURN_IF_ERROR(layer::load_model_config(o.model_config, &config));
    MOE_RETURN_IF_ERROR(io::Checkpoint::open(o.weights, &ckpt));
    layer::RankGroupLayer group;
    MOE_RETURN_IF_ERROR(layer::RankGroupLayer::load(config, layout_of(o), dt, ckpt, o.layer_prefix, &group));
    for (int r = 0; r < group.size() && o.backend == Backend::kCuda; ++r) {
      MOE_RETURN_IF_ERROR(layer::make_layer_resident(group.mutable_rank(r)));
    }
    std::vector<float> x(static_cast<std::size_t>(M * config.hidden));
    for (auto& v : x) v = nd(gen);
    const AnyTensor hidden{x.data(), DType::kF32, {M, config.hidden}, {}};
    layer::MoeLayer::Result r;
    std::vector<double> ms;
    MOE_RETURN_IF_ERROR(group.forward(hidden, std::nullopt, &r, {}, finder(o)));
    MOE_RETURN_IF_ERROR(time_calls(o.iterations, err, [&] { return group.forward(hidden, std::nullopt, &r, {}, finder(o)); }, &ms));
    std::vector<bool> hit(config.num_experts, false);
    for (auto id : r.topk_ids) {
      if (id < config.num_experts) hit[id] = true;
    }
    report(out, "bench " + config.architecture_name + " (ep " + std::to_string(o.ep_size) + " x tp " + std::to_string(o.tp_size) +
                    " ranks in this process" + (o.dispatch == layer::EpDispatch::kPartialSums ? "" : ", all-to-all") + ")",
           *o.backend, M, config.hidden, config.intermediate, config.top_k, std::count(hit.begin(), hit.end(), true),
           dt == DType::kF32 ? 4 : 2, ms);
    return Status::ok();
  }
  layer::MoeLayer l;
  MOE_RETURN_IF_ERROR(load_layer(o, &ckpt, &l, /*make_resident=*/o.backend != Backend::kCuda || M < 1));
  const Index H = l.config().hidden;
  if (o.backend == Backend::kCuda && M >= 1) {  // the layer on the device: graph replays, beside its experts stage alone
    MOE_RETURN_IF_ERROR(layer::DeviceLayer::create(l, dopt, &dev));
    return report_device_layer(out, l.config(), *dev, M, o.iterations);
  }
  std::vector<float> x(M * H);
  for (auto& v : x) v = nd(gen);
  const AnyTensor hidden{x.data(), DType::kF32, {M, H}, {}};
  layer::MoeLayer::Result r;
  std::vector<double> ms;
  MOE_RETURN_IF_ERROR(l.forward(hidden, std::nullopt, &r, {}, finder(o)));
  MOE_RETURN_IF_ERROR(time_calls(o.iterations, err, [&] { return l.forward(hidden, std::nullopt, &r, {}, finder(o)); }, &ms));
  std::vector<bool> hit(l.config().num_experts, false);
  for (auto id : r.topk_ids) {
    if (id < l.config().num_experts) hit[id] = true;  // zero experts (ids >= E) read no weights
  }
  report(out, "bench " + l.config().architecture_name, *o.backend, M, H, l.config().intermediate, l.config().top_k,
         std::count(hit.begin(), hit.end(), true), dt == DType::kF32 ? 4 : 2, ms);
  return Status::ok();
}

}  // namespace

int run_tool(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  Options o;
  if (!args.empty() && (args[0] == "help" || args[0] == "--help" || args[0] == "-h")) {
    out << kUsage;
    return 0;
  }
  const Status p = parse_args(args, &o);
  if (!p.is_ok()) {  // one line; the usage text is `moe help`
    err << "moe: " << p.message() << " (see `moe help`)\n";
    return 2;
  }
  Status s;
  // Every failure ends as the one-line error below, exceptions too (an allocation the machine
  // cannot satisfy, say): the tool never aborts.
  try {
    if (o.launch) {  // the ranks re-parse these arguments, the backend pinned to the launcher's choice
      // Flag and value pairs (parse_args accepted them so): drop the pair whose flag is --launch,
      // never a value that happens to read "--launch".
      std::vector<std::string> rank_args = {args[0]};
      for (std::size_t i = 1; i + 1 < args.size(); i += 2) {
        if (args[i] == "--launch") continue;
        rank_args.insert(rank_args.end(), {args[i], args[i + 1]});
      }
      rank_args.insert(rank_args.end(), {"--backend", std::string(to_string(*o.backend))});
      return launch_local(rank_args, o.ep_size, o.tp_size, o.backend == Backend::kCuda, err);
    }
    if (o.command == "run") s = command_run(o, out);
    else if (o.command == "info") s = command_info(o, out);
    else s = command_bench(o, out, err);
  } catch (const std::bad_alloc&) {
    s = make_status(StatusCode::kInvalidArgument, "out of memory (the sizes asked for need more than this machine has)");
  } catch (const std::exception& e) {
    s = make_status(StatusCode::kInternal, "internal error: ", e.what());
  }
  if (!s.is_ok()) {
    // OUT is written by rename only on success, so a failed run leaves whatever was there (an
    // earlier run's file, or nothing) untouched: the tool deletes nothing but its own temporary.
    std::string msg = s.message();
    for (char& c : msg) if (c == '\n') c = ' ';
    err << "moe " << o.command << ": " << msg << "\n";
    return 1;
  }
  return 0;
}

}  // namespace moe::cli
