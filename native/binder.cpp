// The one thin torch binder over native/cuda (STYLE.md 3): checks every tensor (dtype, shape,
// contiguity, device, alignment), sizes the split-K workspace, and turns the kernels' error codes
// into messages that name the shapes.
//
// Errors come back as a returned string ("" = success; "value: ..." for a bad argument, "cuda: ..."
// for a CUDA failure) that m3edge/runtime/native.py raises as ValueError / RuntimeError. Not a C++
// exception, and no iostream: on the GPU machine (torch 2.11+cu130, its g++) formatting a number
// through std::ostream inside this extension segfaulted (cuda-gdb: basic_ostream::_M_insert<long>
// from desc(), reached by TORCH_CHECK / c10::str too); the same code ran on torch 2.13 here. So the
// messages are built with std::to_string, and returned rather than thrown.
//
// Built with -DM3E_NO_CUDA (no .cu, no CUDA headers) it keeps every check, so the tests can exercise
// them on a machine with no GPU; a call that passes them then says the build has no CUDA.
#include <torch/extension.h>

#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#ifndef M3E_NO_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "cuda/m3e_api.cuh"

namespace {

void app(std::string& s, const char* v) { s += v; }
void app(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void app(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (app(s, a), ...);
  return s;
}

// "[3, 256] Half": shape and dtype, as torch prints them
std::string desc(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "] " + c10::toString(t.scalar_type());
}

bool is_half(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// The MoE's early flag and its readers' count (m3e_moe_args.early, m3e_route_args.early): int32 [2].
bool is_flag_pair(const at::Tensor& t) { return t.dim() == 1 && t.size(0) == 2 && t.scalar_type() == at::kInt; }

#define CHECK_ARG(cond, ...) \
  if (!(cond)) return cat("value: w4a16_gemm: ", __VA_ARGS__)
#define CHECK_MOE(cond, ...) \
  if (!(cond)) return cat("value: moe_w4a16: ", __VA_ARGS__)

#define CHECK_OP(op, cond, ...) \
  if (!(cond)) return cat("value: ", op, ": ", __VA_ARGS__)

// Every tensor contiguous, on the first one's CUDA device (every op's common checks).
std::string check_all(const char* op, const std::vector<std::pair<const char*, const at::Tensor*>>& all) {
  const at::Tensor& x = *all[0].second;
  for (auto& [name, t] : all) {
    if (!t->is_contiguous()) return cat("value: ", op, ": ", name, " ", desc(*t), " must be contiguous");
    if (!t->is_cuda() || t->device() != x.device())
      return cat("value: ", op, ": ", name, " ", desc(*t), " is on ", t->device().str(),
                 "; every tensor must be on the same CUDA device as ", all[0].first, " (", x.device().str(), ")");
  }
  return "";
}

std::string check_shape3(const at::Tensor& t, const char* name, int64_t a, int64_t b, int64_t c) {
  CHECK_ARG(t.dim() == 3 && t.size(0) == a && t.size(1) == b && t.size(2) == c, name, " must be [", a, ", ", b,
            ", ", c, "] (the repacked layout [N/16, G, 16]), got ", desc(t));
  return "";
}

#ifndef M3E_NO_CUDA
struct Workspace {
  at::Tensor ws, cnt;
};
std::vector<Workspace> g_ws;  // one per device; the kernels of one stream use it in turn

void ensure_workspace(int dev, size_t floats, int counters, const at::TensorOptions& opt) {
  if ((int)g_ws.size() <= dev) g_ws.resize(dev + 1);
  Workspace& w = g_ws[dev];
  if (!w.ws.defined() || (size_t)w.ws.numel() < floats)
    w.ws = at::empty({(int64_t)std::max<size_t>(floats, 1 << 16)}, opt.dtype(at::kFloat));
  if (!w.cnt.defined() || w.cnt.numel() < counters)
    w.cnt = at::zeros({std::max<int64_t>(counters, 1024)}, opt.dtype(at::kInt));  // the kernel leaves them 0
}
#endif

}  // namespace

// out[M, N] = x[M, K] @ W^T. w int32 [N/16, K/64, 32, 4]; scales fp16/bf16 [N/16, G, 16]; mins
// (float-minimum form) like scales; zeros uint8 [N/16, G, 16] (zero point + 8); group 32/64/128 or -1.
// splits 0 and n_tile 0 = the plan's choice; n_tile 16/32/64 forces the decode kernel (M <= 8), 128
// the tile kernel. norm_w [K] (x's dtype): x's rows RMS-normed with it first (eps norm_eps), which
// needs the plan's decode kernel with one K slice.
std::string w4a16_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& zeros, at::Tensor& out,
                int64_t group, int64_t splits, int64_t n_tile, const c10::optional<at::Tensor>& norm_w,
                double norm_eps, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& w_lo) {
  CHECK_ARG(x.dim() == 2 && is_half(x), "x must be a 2-D float16 or bfloat16 tensor [M, K], got ", desc(x));
  const int64_t M = x.size(0), K = x.size(1);
  CHECK_ARG(M >= 1, "x [M, K] needs M >= 1, got ", desc(x));
  CHECK_ARG(K % 64 == 0 && K > 0, "K must be a multiple of 64 (pad the weights), got x ", desc(x));
  CHECK_ARG(w.dim() == 4 && w.scalar_type() == at::kInt && w.size(2) == 32 && w.size(3) == 4,
            "w must be the repacked int32 [N/16, K/64, 32, 4] (m3edge.runtime.native.repack), got ", desc(w));
  const int64_t N = w.size(0) * 16;
  CHECK_ARG(w.size(1) * 64 == K, "w ", desc(w), " was repacked for K = ", w.size(1) * 64, " but x ", desc(x),
            " has K = ", K);
  CHECK_ARG(N % 64 == 0 && N > 0, "N must be a multiple of 64, got N = ", N, " (w ", desc(w), ")");
  CHECK_ARG(group == 32 || group == 64 || group == 128 || group == -1,
            "group must be 32, 64, 128 or -1 (per channel), got ", group);
  CHECK_ARG(group == -1 || K % group == 0, "group ", group, " does not divide K = ", K, " (x ", desc(x), ")");
  const int64_t G = group == -1 ? 1 : K / group;
  CHECK_ARG(is_half(scales), "scales must be float16 or bfloat16 (repack converts float32), got ", desc(scales));
  if (auto e = check_shape3(scales, "scales", N / 16, G, 16); !e.empty()) return e;
  if (mins) {
    CHECK_ARG(mins->scalar_type() == scales.scalar_type(), "mins ", desc(*mins), " must have the scales' dtype ",
              c10::toString(scales.scalar_type()));
    if (auto e = check_shape3(*mins, "mins", N / 16, G, 16); !e.empty()) return e;
    CHECK_ARG(!zeros, "a weight has either a float minimum or a zero point, not both");
  }
  if (zeros) {
    CHECK_ARG(zeros->scalar_type() == at::kByte, "zeros must be uint8 (zero point + 8), got ", desc(*zeros));
    if (auto e = check_shape3(*zeros, "zeros", N / 16, G, 16); !e.empty()) return e;
  }
  if (w_lo) {
    CHECK_ARG(w_lo->scalar_type() == at::kInt && w_lo->sizes() == w.sizes(), "w_lo (an int8 weight's low plane) ",
              "must be int32 like w ", desc(w), ", got ", desc(*w_lo));
    CHECK_ARG(!mins && !zeros, "an int8 weight in one pass (w_lo) is symmetric: no mins or zeros");
    CHECK_ARG(n_tile != 128, "an int8 weight in one pass (w_lo) runs on the decode kernel, not n_tile 128");
  }
  CHECK_ARG((out.scalar_type() == x.scalar_type() || out.scalar_type() == at::kFloat) && out.dim() == 2 &&
                out.size(0) == M && out.size(1) == N,
            "out must be [", M, ", ", N, "] ", c10::toString(x.scalar_type()), " or Float, got ", desc(out));
  CHECK_ARG(splits >= 0, "splits must be >= 0 (0 = automatic), got ", splits);
  CHECK_ARG(n_tile == 0 || n_tile == 16 || n_tile == 32 || n_tile == 64 || n_tile == 128,
            "n_tile must be 0 (automatic), 16, 32, 64 (decode kernel) or 128 (tile kernel), got ", n_tile);
  CHECK_ARG(n_tile == 0 || n_tile == 128 || M <= 8, "the decode kernel (n_tile ", n_tile,
            ") takes M <= 8, got x ", desc(x));
  CHECK_ARG(!norm_w || (norm_w->dim() == 1 && norm_w->size(0) == K && norm_w->scalar_type() == x.scalar_type()),
            "norm_w must be [", K, "] of x's dtype, got ", desc(*norm_w));
  CHECK_ARG(!residual || (residual->sizes() == out.sizes() && residual->scalar_type() == x.scalar_type() &&
                          out.scalar_type() == x.scalar_type()),
            "residual must be [", M, ", ", N, "] of x's dtype with an out of x's dtype, got residual ",
            desc(*residual), ", out ", desc(out));
  std::vector<std::pair<const char*, const at::Tensor*>> all = {{"x", &x}, {"w", &w}, {"scales", &scales}, {"out", &out}};
  if (mins) all.push_back({"mins", &*mins});
  if (zeros) all.push_back({"zeros", &*zeros});
  if (norm_w) all.push_back({"norm_w", &*norm_w});
  if (residual) all.push_back({"residual", &*residual});
  if (w_lo) all.push_back({"w_lo", &*w_lo});
  if (auto e = check_all("w4a16_gemm", all); !e.empty()) return e;
#ifdef M3E_NO_CUDA
  return "cuda: w4a16_gemm: this build of the binder has no CUDA kernels (built with M3E_NO_CUDA)";
#else
  for (auto& [name, t] : all)
    CHECK_ARG((reinterpret_cast<uintptr_t>(t->data_ptr()) & 15) == 0, name, " ", desc(*t),
              " must start 16-byte aligned (a view at an odd offset is not; pass a copy)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int dev = x.device().index();
  m3e_w4a16_plan_t plan;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int rc = m3e_w4a16_plan((int)M, (int)N, (int)K, group == -1 ? 0 : (int)group, mins || zeros, sms, (int)splits,
                          (int)n_tile, &plan);
  if (rc != M3E_OK) return cat("value: w4a16_gemm plan for x ", desc(x), ", w ", desc(w), ": ", m3e_error_string(rc));
  CHECK_ARG(!norm_w || (plan.n_tile != 128 && plan.splits == 1), "a fused RMSNorm needs the decode kernel with one K ",
            "slice, and the plan for x ", desc(x), ", w ", desc(w), " is n_tile ", plan.n_tile, ", ", plan.splits,
            " slices");
  CHECK_ARG(!w_lo || plan.n_tile != 128, "an int8 weight in one pass (w_lo) needs the decode kernel (M <= 8, ",
            "M K <= 16384), and the plan for x ", desc(x), ", w ", desc(w), " is the tile kernel");
  ensure_workspace(dev, plan.workspace_floats, plan.n_counters, x.options());
  m3e_w4a16_args a;
  a.x = x.data_ptr();
  a.w = reinterpret_cast<const uint32_t*>(w.data_ptr());
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  a.mins = mins ? reinterpret_cast<const uint16_t*>(mins->data_ptr()) : nullptr;
  a.zeros = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  a.out = out.data_ptr();
  a.workspace = plan.splits > 1 ? g_ws[dev].ws.data_ptr<float>() : nullptr;
  a.counters = plan.splits > 1 ? g_ws[dev].cnt.data_ptr<int>() : nullptr;
  a.M = (int)M;
  a.N = (int)N;
  a.K = (int)K;
  a.group = group == -1 ? 0 : (int)group;
  a.G = (int)G;
  a.act_bf16 = x.scalar_type() == at::kBFloat16;
  a.scale_bf16 = scales.scalar_type() == at::kBFloat16;
  a.out_f32 = out.scalar_type() == at::kFloat;
  a.splits = plan.splits;
  a.n_tile = plan.n_tile;
  a.norm_w = norm_w ? reinterpret_cast<const uint16_t*>(norm_w->data_ptr()) : nullptr;
  a.norm_eps = (float)norm_eps;
  a.residual = residual ? reinterpret_cast<const uint16_t*>(residual->data_ptr()) : nullptr;
  a.w_lo = w_lo ? reinterpret_cast<const uint32_t*>(w_lo->data_ptr()) : nullptr;
  rc = m3e_w4a16_gemm(&a, at::cuda::getCurrentCUDAStream().stream());
  if (rc != M3E_OK)
    return cat(rc == M3E_ERR_CUDA ? "cuda: " : "value: ", "w4a16_gemm(x ", desc(x), ", w ", desc(w), ", group ",
                    group, "): ", m3e_error_string(rc),
                    rc == M3E_ERR_CUDA ? std::string(" (") + cudaGetErrorString(cudaGetLastError()) + ")" : "");
  return "";
#endif
}

std::string check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> shape, const char* layout) {
  bool ok = t.dim() == (int64_t)shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = t.size(i) == shape[i];
  std::string want = "[";
  for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  CHECK_MOE(ok, name, " must be ", want, "] (", layout, "), got ", desc(t));
  return "";
}

// The routed experts of one MoE layer (native/cuda/moe.cu): out[T, H] = sum_j weights[t, j]
// down_e(silu(gate_e(x)) * up_e(x)), e = ids[t, j]. x fp16/bf16 [T, H]; ids int32/int64 [T, k];
// weights fp32 or x's dtype [T, k]; gate+up int32 [E, 2I/16, H/64, 32, 4] (gate and up interleaved by
// 16-row slabs, m3edge.runtime.native.repack_experts), its scales [E, 2I/16, G, 16]; down int32
// [E, H/16, I/64, 32, 4], scales [E, H/16, I/group, 16]; mins / zeros like the scales, both or
// neither. ns_gu / ns_dn 0 = the plan's slabs per CTA; mma_rows 0 = the plan's kernel, -1 the decode
// kernel, 16 / 32 / 64 the mma tile kernel with that many token rows per tile.
std::string moe_w4a16(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w_gu,
                      const at::Tensor& s_gu, const c10::optional<at::Tensor>& mn_gu,
                      const c10::optional<at::Tensor>& zp_gu, const at::Tensor& w_dn, const at::Tensor& s_dn,
                      const c10::optional<at::Tensor>& mn_dn, const c10::optional<at::Tensor>& zp_dn, at::Tensor& out,
                      int64_t group, int64_t ns_gu, int64_t ns_dn, int64_t mma_rows,
                      const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& norm_w,
                      double norm_eps, int64_t pre_id, const c10::optional<at::Tensor>& early) {
  CHECK_MOE(x.dim() == 2 && is_half(x), "x must be a 2-D float16 or bfloat16 tensor [T, H], got ", desc(x));
  const int64_t T = x.size(0), H = x.size(1);
  CHECK_MOE(T >= 1 && H % 64 == 0 && H > 0, "x [T, H] needs T >= 1 and H a multiple of 64, got ", desc(x));
  CHECK_MOE(ids.dim() == 2 && ids.size(0) == T && ids.size(1) >= 1 &&
                (ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong),
            "topk_ids must be int32 or int64 [T, k] with T = ", T, " (x ", desc(x), "), got ", desc(ids));
  const int64_t k = ids.size(1);
  CHECK_MOE(T * k <= (1 << 24), "T k = ", T * k, " pairs is more than one launch takes (2^24)");
  CHECK_MOE(weights.dim() == 2 && weights.size(0) == T && weights.size(1) == k &&
                (weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type()),
            "topk_weights must be [", T, ", ", k, "] float32 or ", c10::toString(x.scalar_type()), ", got ",
            desc(weights));
  CHECK_MOE(w_gu.dim() == 5 && w_gu.scalar_type() == at::kInt && w_gu.size(3) == 32 && w_gu.size(4) == 4,
            "gate_up.w must be the repacked int32 [E, 2I/16, H/64, 32, 4] (m3edge.runtime.native.repack_experts), got ",
            desc(w_gu));
  const int64_t E = w_gu.size(0), I = w_gu.size(1) * 8;
  CHECK_MOE(E >= 1 && E <= 1024, "E must be 1..1024 experts, got gate_up.w ", desc(w_gu));
  CHECK_MOE(w_gu.size(2) * 64 == H, "gate_up.w ", desc(w_gu), " was repacked for H = ", w_gu.size(2) * 64,
            " but x ", desc(x), " has H = ", H);
  CHECK_MOE(I % 64 == 0 && I > 0, "the intermediate size I must be a multiple of 64, got I = ", I, " (gate_up.w ",
            desc(w_gu), ")");
  CHECK_MOE(group == 32 || group == 64 || group == 128 || group == -1,
            "group must be 32, 64, 128 or -1 (per channel), got ", group);
  CHECK_MOE(group == -1 || (H % group == 0 && I % group == 0), "group ", group, " must divide H = ", H,
            " and I = ", I);
  const int64_t G_gu = group == -1 ? 1 : H / group, G_dn = group == -1 ? 1 : I / group;
  if (auto e = check_shape(w_dn, "down.w", {E, H / 16, I / 64, 32, 4}, "int32 [E, H/16, I/64, 32, 4]"); !e.empty())
    return e;
  CHECK_MOE(w_dn.scalar_type() == at::kInt, "down.w must be int32, got ", desc(w_dn));
  CHECK_MOE(is_half(s_gu) && s_dn.scalar_type() == s_gu.scalar_type(),
            "scales must be float16 or bfloat16, the same for gate_up and down, got ", desc(s_gu), " and ",
            desc(s_dn));
  if (auto e = check_shape(s_gu, "gate_up.scales", {E, I / 8, G_gu, 16}, "[E, 2I/16, G, 16]"); !e.empty()) return e;
  if (auto e = check_shape(s_dn, "down.scales", {E, H / 16, G_dn, 16}, "[E, H/16, G, 16]"); !e.empty()) return e;
  CHECK_MOE(mn_gu.has_value() == mn_dn.has_value() && zp_gu.has_value() == zp_dn.has_value(),
            "gate_up and down must have the same form (both with mins, both with zeros, or neither)");
  CHECK_MOE(!(mn_gu && zp_gu), "a weight has either a float minimum or a zero point, not both");
  if (mn_gu) {
    CHECK_MOE(mn_gu->scalar_type() == s_gu.scalar_type() && mn_dn->scalar_type() == s_gu.scalar_type(),
              "mins must have the scales' dtype ", c10::toString(s_gu.scalar_type()), ", got ", desc(*mn_gu), " and ",
              desc(*mn_dn));
    if (auto e = check_shape(*mn_gu, "gate_up.mins", {E, I / 8, G_gu, 16}, "[E, 2I/16, G, 16]"); !e.empty()) return e;
    if (auto e = check_shape(*mn_dn, "down.mins", {E, H / 16, G_dn, 16}, "[E, H/16, G, 16]"); !e.empty()) return e;
  }
  if (zp_gu) {
    CHECK_MOE(zp_gu->scalar_type() == at::kByte && zp_dn->scalar_type() == at::kByte,
              "zeros must be uint8 (zero point + 8), got ", desc(*zp_gu), " and ", desc(*zp_dn));
    if (auto e = check_shape(*zp_gu, "gate_up.zeros", {E, I / 8, G_gu, 16}, "[E, 2I/16, G, 16]"); !e.empty()) return e;
    if (auto e = check_shape(*zp_dn, "down.zeros", {E, H / 16, G_dn, 16}, "[E, H/16, G, 16]"); !e.empty()) return e;
  }
  CHECK_MOE((out.scalar_type() == x.scalar_type() || out.scalar_type() == at::kFloat) && out.dim() == 2 &&
                out.size(0) == T && out.size(1) == H,
            "out must be [", T, ", ", H, "] ", c10::toString(x.scalar_type()), " or Float, got ", desc(out));
  CHECK_MOE(!residual || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type()),
            "residual must be like x ", desc(x), ", got ", residual ? desc(*residual) : std::string());
  CHECK_MOE(!norm_w || (norm_w->dim() == 1 && norm_w->size(0) == x.size(1) && norm_w->scalar_type() == x.scalar_type()),
            "norm_w must be [", x.size(1), "] of x's dtype, got ", desc(*norm_w));
  CHECK_MOE(!norm_w || (x.size(0) == 1 && mma_rows <= 0), "a fused RMSNorm takes one token on the decode kernel, got x ",
            desc(x), " and mma_rows ", mma_rows);
  CHECK_MOE(pre_id < 0 || (x.size(0) == 1 && mma_rows <= 0 && pre_id < w_gu.size(0)),
            "pre_id (the last slot's expert, known before routing) takes one token on the decode kernel and an id "
            "below E = ", w_gu.size(0), ", got x ", desc(x), ", mma_rows ", mma_rows, ", pre_id ", pre_id);
  CHECK_MOE(!early || (pre_id >= 0 && is_flag_pair(*early)),
            "early needs pre_id and must be int32 [2] (zero before the first call), got ",
            early ? desc(*early) : std::string());
  CHECK_MOE(ns_gu == 0 || ns_gu == 2 || ns_gu == 4 || ns_gu == 8,
            "ns_gu must be 0 (automatic), 2, 4 or 8, got ", ns_gu);
  CHECK_MOE(ns_dn == 0 || ns_dn == 1 || ns_dn == 2 || ns_dn == 4 || ns_dn == 8,
            "ns_dn must be 0 (automatic), 1, 2, 4 or 8, got ", ns_dn);
  CHECK_MOE(mma_rows == 0 || mma_rows == -1 || mma_rows == 16 || mma_rows == 32 || mma_rows == 64,
            "mma_rows must be 0 (automatic), -1 (the decode kernel), 16, 32 or 64, got ", mma_rows);
  CHECK_MOE(mma_rows <= 0 || (ns_gu == 0 && ns_dn == 0), "ns_gu / ns_dn choose the decode kernel's slabs per CTA;",
            " they cannot be combined with mma_rows = ", mma_rows, " (the tile kernel)");
  std::vector<std::pair<const char*, const at::Tensor*>> all = {
      {"x", &x}, {"topk_ids", &ids}, {"topk_weights", &weights}, {"gate_up.w", &w_gu}, {"gate_up.scales", &s_gu},
      {"down.w", &w_dn}, {"down.scales", &s_dn}, {"out", &out}};
  if (mn_gu) all.insert(all.end(), {{"gate_up.mins", &*mn_gu}, {"down.mins", &*mn_dn}});
  if (zp_gu) all.insert(all.end(), {{"gate_up.zeros", &*zp_gu}, {"down.zeros", &*zp_dn}});
  if (residual) all.push_back({"residual", &*residual});
  if (norm_w) all.push_back({"norm_w", &*norm_w});
  if (early) all.push_back({"early", &*early});
  if (auto e = check_all("moe_w4a16", all); !e.empty()) return e;
#ifdef M3E_NO_CUDA
  return "cuda: moe_w4a16: this build of the binder has no CUDA kernels (built with M3E_NO_CUDA)";
#else
  for (auto& [name, t] : all)
    CHECK_MOE((reinterpret_cast<uintptr_t>(t->data_ptr()) & 15) == 0, name, " ", desc(*t),
              " must start 16-byte aligned (a view at an odd offset is not; pass a copy)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int dev = x.device().index();
  m3e_moe_plan_t plan;
  int rc = m3e_moe_plan((int)T, (int)k, (int)E, (int)H, (int)I, group == -1 ? 0 : (int)group, mn_gu || zp_gu,
                        (int)ns_gu, (int)ns_dn, (int)mma_rows, &plan);
  if (rc != M3E_OK)
    return cat("value: moe_w4a16 plan for x ", desc(x), ", gate_up.w ", desc(w_gu), ": ", m3e_error_string(rc));
  ensure_workspace(dev, plan.slot_floats, plan.n_counters, x.options());
  // per call, from torch's caching allocator (stream-ordered, no device allocation in steady state)
  at::Tensor inter = at::empty({T * k, I}, x.options());
  at::Tensor rows = at::empty({T * k}, x.options().dtype(at::kInt));
  at::Tensor tiles = at::empty({(int64_t)(plan.tiles_gu + plan.tiles_dn) * 4}, x.options().dtype(at::kInt));
  m3e_moe_args a;
  a.x = x.data_ptr();
  a.ids = ids.data_ptr();
  a.weights = weights.data_ptr();
  a.w_gu = reinterpret_cast<const uint32_t*>(w_gu.data_ptr());
  a.s_gu = reinterpret_cast<const uint16_t*>(s_gu.data_ptr());
  a.mn_gu = mn_gu ? reinterpret_cast<const uint16_t*>(mn_gu->data_ptr()) : nullptr;
  a.zp_gu = zp_gu ? zp_gu->data_ptr<uint8_t>() : nullptr;
  a.w_dn = reinterpret_cast<const uint32_t*>(w_dn.data_ptr());
  a.s_dn = reinterpret_cast<const uint16_t*>(s_dn.data_ptr());
  a.mn_dn = mn_dn ? reinterpret_cast<const uint16_t*>(mn_dn->data_ptr()) : nullptr;
  a.zp_dn = zp_dn ? zp_dn->data_ptr<uint8_t>() : nullptr;
  a.out = out.data_ptr();
  a.inter = inter.data_ptr();
  a.rows = rows.data_ptr<int>();
  a.tiles = tiles.data_ptr<int>();
  a.slots = g_ws[dev].ws.data_ptr<float>();
  a.counters = g_ws[dev].cnt.data_ptr<int>();
  a.T = (int)T;
  a.topk = (int)k;
  a.E = (int)E;
  a.H = (int)H;
  a.I = (int)I;
  a.group = group == -1 ? 0 : (int)group;
  a.act_bf16 = x.scalar_type() == at::kBFloat16;
  a.scale_bf16 = s_gu.scalar_type() == at::kBFloat16;
  a.out_f32 = out.scalar_type() == at::kFloat;
  a.ids_i64 = ids.scalar_type() == at::kLong;
  a.weights_f32 = weights.scalar_type() == at::kFloat;
  a.ns_gu = (int)ns_gu;
  a.ns_dn = (int)ns_dn;
  a.mma_rows = (int)mma_rows;
  a.residual = residual ? residual->data_ptr() : nullptr;
  a.norm_w = norm_w ? norm_w->data_ptr() : nullptr;
  a.norm_eps = (float)norm_eps;
  a.pre_routed = pre_id >= 0;
  a.pre_id = (int)pre_id;
  a.early = early ? early->data_ptr<int>() : nullptr;
  rc = m3e_moe_w4a16(&a, at::cuda::getCurrentCUDAStream().stream());
  if (rc != M3E_OK)
    return cat(rc == M3E_ERR_CUDA ? "cuda: " : "value: ", "moe_w4a16(x ", desc(x), ", gate_up.w ", desc(w_gu),
               ", down.w ", desc(w_dn), ", group ", group, "): ", m3e_error_string(rc),
               rc == M3E_ERR_CUDA ? std::string(" (") + cudaGetErrorString(cudaGetLastError()) + ")" : "");
  return "";
#endif
}

#ifndef M3E_NO_CUDA
std::string run_status(const char* op, int rc) {
  if (rc == M3E_OK) return "";
  return cat(rc == M3E_ERR_CUDA ? "cuda: " : "value: ", op, ": ", m3e_error_string(rc),
             rc == M3E_ERR_CUDA ? std::string(" (") + cudaGetErrorString(cudaGetLastError()) + ")" : "");
}
#endif

// MoE routing (native/cuda/decode_ops.cu): x [T, H] fp16/bf16, routers [R, E, H] x's dtype, modality
// int64 [T], fusion_ok bool [T] -> ids int32 / weights fp32 [T, k (+1 with extra_id >= 0)].
std::string route_topk(const at::Tensor& x, const at::Tensor& routers, const at::Tensor& modality,
                       const at::Tensor& fusion_ok, at::Tensor& ids, at::Tensor& weights, int64_t k, int64_t n_fusion,
                       bool norm_topk, int64_t extra_id, double scale, const c10::optional<at::Tensor>& norm_w,
                       double norm_eps, const c10::optional<at::Tensor>& early) {
  CHECK_OP("route_topk", x.dim() == 2 && is_half(x), "x must be a 2-D float16 or bfloat16 tensor [T, H], got ",
           desc(x));
  const int64_t T = x.size(0), H = x.size(1);
  CHECK_OP("route_topk", routers.dim() == 3 && routers.size(2) == H && routers.scalar_type() == x.scalar_type(),
           "routers must be [R, E, ", H, "] of x's dtype (x ", desc(x), "), got ", desc(routers));
  const int64_t E = routers.size(1);
  CHECK_OP("route_topk", E >= 1 && E <= 256 && k >= 1 && k <= 16 && k <= E && n_fusion >= 0 && n_fusion < E,
           "needs 1 <= E <= 256, 1 <= k <= min(16, E), 0 <= n_fusion < E; got E ", E, ", k ", k, ", n_fusion ",
           n_fusion);
  CHECK_OP("route_topk", H % 8 == 0, "H must be a multiple of 8 (16-byte loads), got x ", desc(x));
  CHECK_OP("route_topk", modality.dim() == 1 && modality.size(0) == T && modality.scalar_type() == at::kLong,
           "modality must be int64 [", T, "], got ", desc(modality));
  CHECK_OP("route_topk", fusion_ok.dim() == 1 && fusion_ok.size(0) == T && fusion_ok.scalar_type() == at::kBool,
           "fusion_ok must be bool [", T, "], got ", desc(fusion_ok));
  const int64_t width = k + (extra_id >= 0);
  CHECK_OP("route_topk", ids.dim() == 2 && ids.size(0) == T && ids.size(1) == width && ids.scalar_type() == at::kInt,
           "ids must be int32 [", T, ", ", width, "], got ", desc(ids));
  CHECK_OP("route_topk", weights.dim() == 2 && weights.size(0) == T && weights.size(1) == width &&
               weights.scalar_type() == at::kFloat,
           "weights must be float32 [", T, ", ", width, "], got ", desc(weights));
  CHECK_OP("route_topk", !norm_w || (norm_w->dim() == 1 && norm_w->size(0) == H && norm_w->scalar_type() == x.scalar_type()),
           "norm_w must be [", H, "] of x's dtype, got ", desc(*norm_w));
  std::vector<std::pair<const char*, const at::Tensor*>> all = {
      {"x", &x}, {"routers", &routers}, {"modality", &modality}, {"fusion_ok", &fusion_ok}, {"ids", &ids},
      {"weights", &weights}};
  CHECK_OP("route_topk", !early || is_flag_pair(*early),
           "early must be int32 [2], got ", early ? desc(*early) : std::string());
  if (norm_w) all.push_back({"norm_w", &*norm_w});
  if (early) all.push_back({"early", &*early});
  if (auto e = check_all("route_topk", all); !e.empty()) return e;
#ifdef M3E_NO_CUDA
  return "cuda: route_topk: this build of the binder has no CUDA kernels (built with M3E_NO_CUDA)";
#else
  std::vector<std::pair<const char*, const at::Tensor*>> vectors = {{"x", &x}, {"routers", &routers}};  // 16-byte loads
  if (norm_w) vectors.push_back({"norm_w", &*norm_w});
  for (auto& [name, t] : vectors)
    CHECK_OP("route_topk", (reinterpret_cast<uintptr_t>(t->data_ptr()) & 15) == 0, name, " ", desc(*t),
             " must start 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor logits = at::empty({T, E}, x.options().dtype(at::kFloat));
  const int dev = x.device().index();
  ensure_workspace(dev, 0, (int)T, x.options());  // the per-token arrival counters (kernels leave them 0)
  m3e_route_args a;
  a.logits = logits.data_ptr<float>();
  a.counters = g_ws[dev].cnt.data_ptr<int>();
  a.x = x.data_ptr();
  a.routers = routers.data_ptr();
  a.modality = modality.data_ptr<int64_t>();
  a.fusion_ok = reinterpret_cast<const uint8_t*>(fusion_ok.data_ptr());
  a.ids = ids.data_ptr<int>();
  a.weights = weights.data_ptr<float>();
  a.T = (int)T;
  a.H = (int)H;
  a.E = (int)E;
  a.R = (int)routers.size(0);
  a.k = (int)k;
  a.n_fusion = (int)n_fusion;
  a.norm_topk = norm_topk;
  a.extra_id = (int)extra_id;
  a.act_bf16 = x.scalar_type() == at::kBFloat16;
  a.scale = (float)scale;
  a.norm_w = norm_w ? norm_w->data_ptr() : nullptr;
  a.norm_eps = (float)norm_eps;
  a.early = early ? early->data_ptr<int>() : nullptr;
  return run_status("route_topk", m3e_route(&a, at::cuda::getCurrentCUDAStream().stream()));
#endif
}

// The checks the q/k/v epilogue ops share: qkv [T, (nh + 2 nkv) D] (D a multiple of 32 up to 512),
// q_norm / k_norm [D] or None, cos / sin [T, D], k_cache / v_cache [nkv, cap, D], pos int64 [1] or
// None (then slots pos0 .. pos0 + T - 1 must be in the cache), all of qkv's dtype and device. `own`:
// the op's own shape checks (run after these, before the device checks); `more`: the op's own
// tensors, checked for contiguity and device too.
std::string check_qkv_epilogue(const char* op, const at::Tensor& qkv, const c10::optional<at::Tensor>& q_norm,
                               const c10::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const c10::optional<at::Tensor>& pos, int64_t pos0, int64_t nh, int64_t nkv,
                               const std::function<std::string(int64_t T, int64_t D)>& own,
                               std::vector<std::pair<const char*, const at::Tensor*>> more) {
  CHECK_OP(op, qkv.dim() == 2 && is_half(qkv) && nh >= 1 && nkv >= 1 && nh % nkv == 0 &&
               qkv.size(1) % (nh + 2 * nkv) == 0,
           "qkv must be float16 or bfloat16 [T, (nh + 2 nkv) D] with nh ", nh, ", nkv ", nkv, ", got ", desc(qkv));
  const int64_t T = qkv.size(0), D = qkv.size(1) / (nh + 2 * nkv);
  CHECK_OP(op, D % 32 == 0 && D <= 512, "head_dim must be a multiple of 32 up to 512, got ", D);
  const auto dt = qkv.scalar_type();
  auto is = [&](const at::Tensor& t, std::vector<int64_t> shape) {
    if (t.scalar_type() != dt || t.dim() != (int64_t)shape.size()) return false;
    for (size_t i = 0; i < shape.size(); ++i)
      if (t.size(i) != shape[i]) return false;
    return true;
  };
  CHECK_OP(op, !q_norm || is(*q_norm, {D}), "q_norm must be [", D, "] of qkv's dtype, got ", desc(*q_norm));
  CHECK_OP(op, !k_norm || is(*k_norm, {D}), "k_norm must be [", D, "] of qkv's dtype, got ", desc(*k_norm));
  CHECK_OP(op, is(cos, {T, D}) && is(sin, {T, D}), "cos and sin must be [", T, ", ", D,
           "] of qkv's dtype, got ", desc(cos), " and ", desc(sin));
  CHECK_OP(op, k_cache.dim() == 3 && is(k_cache, {nkv, k_cache.size(1), D}) && is(v_cache, k_cache.sizes().vec()),
           "k_cache and v_cache must be [", nkv, ", cap, ", D, "] of qkv's dtype, got ", desc(k_cache), " and ",
           desc(v_cache));
  const int64_t cap = k_cache.size(1);
  CHECK_OP(op, pos || (pos0 >= 0 && pos0 + T <= cap), "slots ", pos0, "..", pos0 + T - 1,
           " are outside the cache's ", cap);
  CHECK_OP(op, !pos || (pos->dim() == 1 && pos->size(0) == 1 && pos->scalar_type() == at::kLong),
           "pos must be int64 [1], got ", desc(*pos));
  if (auto e = own(T, D); !e.empty()) return e;
  std::vector<std::pair<const char*, const at::Tensor*>> all = {
      {"qkv", &qkv}, {"cos", &cos}, {"sin", &sin}, {"k_cache", &k_cache}, {"v_cache", &v_cache}};
  all.insert(all.end(), more.begin(), more.end());
  if (q_norm) all.push_back({"q_norm", &*q_norm});
  if (k_norm) all.push_back({"k_norm", &*k_norm});
  if (pos) all.push_back({"pos", &*pos});
  return check_all(op, all);
}

#ifndef M3E_NO_CUDA
// The fields m3e_rope_args and m3e_attn_args share, from the tensors of check_qkv_epilogue.
template <typename Args>
void fill_qkv_epilogue(Args& a, const at::Tensor& qkv, const c10::optional<at::Tensor>& q_norm,
                       const c10::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin,
                       at::Tensor& k_cache, at::Tensor& v_cache, const c10::optional<at::Tensor>& pos, int64_t pos0,
                       int64_t nh, int64_t nkv, double eps) {
  a.qkv = qkv.data_ptr();
  a.q_norm = q_norm ? q_norm->data_ptr() : nullptr;
  a.k_norm = k_norm ? k_norm->data_ptr() : nullptr;
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.pos_dev = pos ? pos->data_ptr<int64_t>() : nullptr;
  a.pos0 = (int)pos0;
  a.nh = (int)nh;
  a.nkv = (int)nkv;
  a.D = (int)(qkv.size(1) / (nh + 2 * nkv));
  a.cap = (int)k_cache.size(1);
  a.act_bf16 = qkv.scalar_type() == at::kBFloat16;
  a.eps = (float)eps;
}
#endif

// q/k/v epilogue (native/cuda/decode_ops.cu), batch 1: the tensors of check_qkv_epilogue and q_out
// [nh, T, D]; pos (or pos0) is the cache slot of token 0.
std::string rope_qkv(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_norm,
                     const c10::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin,
                     at::Tensor& q_out, at::Tensor& k_cache, at::Tensor& v_cache, const c10::optional<at::Tensor>& pos,
                     int64_t pos0, int64_t nh, int64_t nkv, double eps) {
  auto own = [&](int64_t T, int64_t D) -> std::string {
    CHECK_OP("rope_qkv", q_out.scalar_type() == qkv.scalar_type() && q_out.dim() == 3 && q_out.size(0) == nh &&
                 q_out.size(1) == T && q_out.size(2) == D,
             "q_out must be [", nh, ", ", T, ", ", D, "], got ", desc(q_out));
    return "";
  };
  if (auto e = check_qkv_epilogue("rope_qkv", qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, pos0, nh, nkv, own,
                                  {{"q_out", &q_out}});
      !e.empty())
    return e;
#ifdef M3E_NO_CUDA
  return "cuda: rope_qkv: this build of the binder has no CUDA kernels (built with M3E_NO_CUDA)";
#else
  const c10::cuda::CUDAGuard guard(qkv.device());
  m3e_rope_args a;
  fill_qkv_epilogue(a, qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, pos0, nh, nkv, eps);
  a.q_out = q_out.data_ptr();
  a.T = (int)qkv.size(0);
  return run_status("rope_qkv", m3e_rope_qkv(&a, at::cuda::getCurrentCUDAStream().stream()));
#endif
}

// Batch-1 decode attention (native/cuda/decode_ops.cu): the tensors of check_qkv_epilogue with T = 1,
// out [nh, D] of qkv's dtype, workspace float32 [>= nh * M3E_ATTN_MAX_SPLITS * (D + 2)] and counters
// int32 [>= nkv] (zero; left zero); keys: the slots the launch may see (pos < keys <= cap).
std::string attn_decode(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_norm,
                        const c10::optional<at::Tensor>& k_norm, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& out, at::Tensor& k_cache, at::Tensor& v_cache, const c10::optional<at::Tensor>& pos,
                        int64_t pos0, int64_t keys, int64_t nh, int64_t nkv, double eps, at::Tensor& workspace,
                        at::Tensor& counters) {
  const int64_t cap = k_cache.size(1);
  auto own = [&](int64_t T, int64_t D) -> std::string {
    CHECK_OP("attn_decode", T == 1, "one token (qkv [1, ...]), got ", desc(qkv));
    CHECK_OP("attn_decode", D == 32 || D == 64 || D == 128 || D == 256, "head_dim must be 32, 64, 128 or 256, got ", D);
    CHECK_OP("attn_decode", nh / nkv <= 8, "at most 8 q heads per kv head, got ", nh, " / ", nkv);
    CHECK_OP("attn_decode", keys >= 1 && keys <= cap && (pos || pos0 < keys), "keys ", keys, " must be in 1..", cap,
             " (the cache) and above pos0 ", pos0);
    CHECK_OP("attn_decode", keys <= M3E_ATTN_MAX_SPLITS * (8192 / D), "keys ", keys, " past the most one launch reads (",
             M3E_ATTN_MAX_SPLITS * (8192 / D), " at head_dim ", D, ")");
    CHECK_OP("attn_decode", out.scalar_type() == qkv.scalar_type() && out.numel() == nh * D, "out must hold [", nh,
             ", ", D, "] of qkv's dtype, got ", desc(out));
    CHECK_OP("attn_decode",
             workspace.scalar_type() == at::kFloat && workspace.numel() >= nh * M3E_ATTN_MAX_SPLITS * (D + 2),
             "workspace must be float32 of >= ", nh * M3E_ATTN_MAX_SPLITS * (D + 2), " elements, got ", desc(workspace));
    CHECK_OP("attn_decode", counters.scalar_type() == at::kInt && counters.numel() >= nkv,
             "counters must be int32 of >= ", nkv, " elements, got ", desc(counters));
    return "";
  };
  if (auto e = check_qkv_epilogue("attn_decode", qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, pos0, nh, nkv,
                                  own, {{"out", &out}, {"workspace", &workspace}, {"counters", &counters}});
      !e.empty())
    return e;
#ifdef M3E_NO_CUDA
  return "cuda: attn_decode: this build of the binder has no CUDA kernels (built with M3E_NO_CUDA)";
#else
  const c10::cuda::CUDAGuard guard(qkv.device());
  m3e_attn_args a;
  fill_qkv_epilogue(a, qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, pos0, nh, nkv, eps);
  a.out = out.data_ptr();
  a.workspace = workspace.data_ptr<float>();
  a.counters = counters.data_ptr<int>();
  a.keys = (int)keys;
  if (int rc = m3e_attn_plan(a.keys, a.D, &a.splits, &a.chunk); rc != M3E_OK) return run_status("attn_decode", rc);
  return run_status("attn_decode", m3e_attn_decode(&a, at::cuda::getCurrentCUDAStream().stream()));
#endif
}

// RMSNorm (native/cuda/decode_ops.cu): x, out [T, H] fp16/bf16, w [H], all one dtype, H % 8 == 0. With
// a residual (like x), x becomes x + residual in place and that is normed.
std::string rmsnorm(at::Tensor& x, const at::Tensor& w, at::Tensor& out, double eps,
                    const c10::optional<at::Tensor>& residual) {
  CHECK_OP("rmsnorm", x.dim() == 2 && is_half(x) && x.size(1) % 8 == 0,
           "x must be float16 or bfloat16 [T, H] with H a multiple of 8, got ", desc(x));
  CHECK_OP("rmsnorm", w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
           "w must be [", x.size(1), "] of x's dtype, got ", desc(w));
  CHECK_OP("rmsnorm", out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "out must be like x ",
           desc(x), ", got ", desc(out));
  CHECK_OP("rmsnorm", !residual || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type()),
           "residual must be like x ", desc(x), ", got ", residual ? desc(*residual) : std::string());
  std::vector<std::pair<const char*, const at::Tensor*>> all = {{"x", &x}, {"w", &w}, {"out", &out}};
  if (residual) all.push_back({"residual", &*residual});
  if (auto e = check_all("rmsnorm", all); !e.empty()) return e;
#ifdef M3E_NO_CUDA
  return "cuda: rmsnorm: this build of the binder has no CUDA kernels (built with M3E_NO_CUDA)";
#else
  const c10::cuda::CUDAGuard guard(x.device());
  return run_status("rmsnorm", m3e_rmsnorm(x.data_ptr(), residual ? residual->data_ptr() : nullptr, w.data_ptr(),
                                           out.data_ptr(), (int)x.size(0),
                                           (int)x.size(1), (float)eps, x.scalar_type() == at::kBFloat16,
                                           at::cuda::getCurrentCUDAStream().stream()));
#endif
}

// (ns_gu, mr_gu, ns_dn, mr_dn, tiles_gu, tiles_dn, mma_rows) that moe_w4a16 would use; empty when refused.
std::vector<int64_t> moe_plan(int64_t T, int64_t topk, int64_t E, int64_t H, int64_t I, int64_t group, bool affine,
                              int64_t ns_gu, int64_t ns_dn, int64_t mma_rows) {
#ifdef M3E_NO_CUDA
  return {};
#else
  m3e_moe_plan_t p;
  if (m3e_moe_plan((int)T, (int)topk, (int)E, (int)H, (int)I, group == -1 ? 0 : (int)group, affine, (int)ns_gu,
                   (int)ns_dn, (int)mma_rows, &p) != M3E_OK)
    return {};
  return {p.ns_gu, p.mr_gu, p.ns_dn, p.mr_dn, p.tiles_gu, p.tiles_dn, p.mma_rows};
#endif
}

// (m_tile, splits, grid_x, grid_y, workspace_floats, n_tile) that w4a16_gemm would use for a weight
// of this group (-1 per channel) and form (affine: zero points or minimums): for the benchmark and
// the tests. An empty list when the shape is refused.
std::vector<int64_t> w4a16_plan(int64_t M, int64_t N, int64_t K, int64_t splits, int64_t sms, int64_t n_tile,
                                int64_t group, bool affine) {
#ifdef M3E_NO_CUDA
  return {};
#else
  m3e_w4a16_plan_t plan;
  const int rc = m3e_w4a16_plan((int)M, (int)N, (int)K, group == -1 ? 0 : (int)group, affine, (int)sms,
                                (int)splits, (int)n_tile, &plan);
  if (rc != M3E_OK) return {};
  return {plan.m_tile, plan.splits, plan.grid_x, plan.grid_y, (int64_t)plan.workspace_floats, plan.n_tile};
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w4a16_gemm", &w4a16_gemm,
        "out[M, N] = x[M, K] @ W^T, W int4 repacked (native/cuda/w4a16.cuh), or int8 as two int4 planes (w, w_lo); "
        "returns an error message or ''",
        py::arg("x"), py::arg("w"), py::arg("scales"), py::arg("mins"), py::arg("zeros"), py::arg("out"),
        py::arg("group"), py::arg("splits") = 0, py::arg("n_tile") = 0, py::arg("norm_w") = py::none(),
        py::arg("norm_eps") = 1e-6, py::arg("residual") = py::none(), py::arg("w_lo") = py::none());
  m.def("w4a16_plan", &w4a16_plan, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("splits") = 0,
        py::arg("sms") = 132, py::arg("n_tile") = 0, py::arg("group") = 128, py::arg("affine") = false);
  m.def("moe_w4a16", &moe_w4a16,
        "fused int4 MoE (native/cuda/moe.cu): out = sum_j w[t, j] down_e(silu(gate_e(x)) * up_e(x)); returns an "
        "error message or ''",
        py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("w_gu"), py::arg("s_gu"),
        py::arg("mn_gu"), py::arg("zp_gu"), py::arg("w_dn"), py::arg("s_dn"), py::arg("mn_dn"), py::arg("zp_dn"),
        py::arg("out"), py::arg("group"), py::arg("ns_gu") = 0, py::arg("ns_dn") = 0, py::arg("mma_rows") = 0,
        py::arg("residual") = py::none(), py::arg("norm_w") = py::none(), py::arg("norm_eps") = 1e-6,
        py::arg("pre_id") = -1, py::arg("early") = py::none());
  m.def("moe_plan", &moe_plan, py::arg("T"), py::arg("topk"), py::arg("E"), py::arg("H"), py::arg("I"),
        py::arg("group") = 128, py::arg("affine") = false, py::arg("ns_gu") = 0, py::arg("ns_dn") = 0,
        py::arg("mma_rows") = 0);
  m.def("route_topk", &route_topk, "MoE routing (native/cuda/decode_ops.cu); returns an error message or ''",
        py::arg("x"), py::arg("routers"), py::arg("modality"), py::arg("fusion_ok"), py::arg("ids"),
        py::arg("weights"), py::arg("k"), py::arg("n_fusion"), py::arg("norm_topk"), py::arg("extra_id"),
        py::arg("scale"), py::arg("norm_w") = py::none(), py::arg("norm_eps") = 1e-6, py::arg("early") = py::none());
  m.def("rmsnorm", &rmsnorm, "RMSNorm (native/cuda/decode_ops.cu); returns an error message or ''", py::arg("x"),
        py::arg("w"), py::arg("out"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("rope_qkv", &rope_qkv, "q/k norm, RoPE, KV-cache write (native/cuda/decode_ops.cu); returns an error or ''",
        py::arg("qkv"), py::arg("q_norm"), py::arg("k_norm"), py::arg("cos"), py::arg("sin"), py::arg("q_out"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"), py::arg("pos0"), py::arg("nh"), py::arg("nkv"),
        py::arg("eps"));
  m.def("attn_decode", &attn_decode,
        "batch-1 decode attention with the q/k/v epilogue (native/cuda/decode_ops.cu); returns an error or ''",
        py::arg("qkv"), py::arg("q_norm"), py::arg("k_norm"), py::arg("cos"), py::arg("sin"), py::arg("out"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("pos"), py::arg("pos0"), py::arg("keys"), py::arg("nh"),
        py::arg("nkv"), py::arg("eps"), py::arg("workspace"), py::arg("counters"));
#ifdef M3E_NO_CUDA
  m.attr("has_cuda") = false;
#else
  m.attr("has_cuda") = true;
#endif
}
