// One decoder layer of a decode-only step as a single op: the same airun ops, in the same order, as the Python path of
// airun/model/llama.py takes for int4 VNNI projections and native attention, without Python between them (about ten
// op calls a layer from Python: the demo's single-stream decode step went from 4.7 to 2.8 ms without them).
//
//   h = norm1(x [+ residual])                      (the sum written into residual; without residual, residual = x)
//   q, k = rope(qkv(h)), k and v into the cache     o = attention(q) over the cache
//   h = norm2(o_proj(o) + residual)                 out = down(silu(gate(h)) * up(h))
// Returns (out, residual): the layer's output is their sum, which the next layer's norm forms.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using Linear = at::Tensor(const at::Tensor&, const at::Tensor&, bool, int64_t);
using Norm = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using AddNorm = at::Tensor(const at::Tensor&, at::Tensor&, const at::Tensor&, double);
using Rope = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                                                at::Tensor&, const at::Tensor&, int64_t, int64_t);
using Attend = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, double);
using SiluMul = at::Tensor(const at::Tensor&);

std::tuple<at::Tensor, at::Tensor> decoder_layer(
    const at::Tensor& x, const std::optional<at::Tensor>& residual_in, const at::Tensor& norm1, const at::Tensor& norm2,
    double eps, const at::Tensor& qkv_w, bool qkv_asym, const at::Tensor& o_w, bool o_asym, const at::Tensor& gate_up_w,
    bool gate_up_asym, const at::Tensor& down_w, bool down_asym, int64_t levels, const at::Tensor& cos,
    const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
    const at::Tensor& block_tables, const at::Tensor& ctx_lens, int64_t heads, int64_t kv_heads, double scale) {
  static const auto linear = handle<Linear>("airun_int4::linear");
  static const auto norm = handle<Norm>("airun_fused::rms_norm");
  static const auto add_norm = handle<AddNorm>("airun_fused::add_rms_norm");
  static const auto rope_kv = handle<Rope>("airun_fused::rope_kv");
  static const auto attend = handle<Attend>("airun_attn::decode");
  static const auto silu_mul = handle<SiluMul>("airun_fused::silu_mul");
  at::Tensor residual = residual_in.has_value() ? *residual_in : x;
  at::Tensor h = residual_in.has_value() ? add_norm.call(x, residual, norm1, eps) : norm.call(x, norm1, eps);
  const at::Tensor qkv = linear.call(h, qkv_w, qkv_asym, levels);
  const auto qk = rope_kv.call(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads);
  const at::Tensor o = attend.call(std::get<0>(qk), k_cache, v_cache, block_tables, ctx_lens, scale);
  h = add_norm.call(linear.call(o, o_w, o_asym, levels), residual, norm2, eps);
  const at::Tensor act = silu_mul.call(linear.call(h, gate_up_w, gate_up_asym, levels));
  return {linear.call(act, down_w, down_asym, levels), residual};
}

}  // namespace

TORCH_LIBRARY(airun_layer, m) {
  m.def("decode(Tensor x, Tensor(a!)? residual, Tensor norm1, Tensor norm2, float eps, Tensor qkv, bool qkv_asym, "
        "Tensor o, bool o_asym, Tensor gate_up, bool gate_up_asym, Tensor down, bool down_asym, int levels, "
        "Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots, Tensor block_tables, "
        "Tensor ctx_lens, int heads, int kv_heads, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(airun_layer, CPU, m) { m.impl("decode", &decoder_layer); }
