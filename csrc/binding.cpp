// Torch binding of the CUDA kernels: the ops excitor_kernels_cuda::fwd / ::bwd. Inputs arrive validated by
// excitor_kernels/_cuda.py (device, dtypes, shapes, d in {64, 128}, P <= 64, 16-byte aligned rows); this
// file only allocates outputs and float32 workspaces, fills the C parameter structs and launches.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "excitor_attention.h"

namespace {

using at::Tensor;

// (B, H, rows, d) or batch-shared (H, rows, d) strides in elements.
EkStrides strides(const Tensor &t) {
  if (t.dim() == 3) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

void check(int err, const char *what) {
  TORCH_CHECK(err == 0, "excitor_kernels CUDA ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// Outputs start as NaN when the Python side asks (tests: an element a kernel forgets to write shows up).
void maybe_poison(bool poison, std::initializer_list<Tensor> ts) {
  if (poison)
    for (const Tensor &t : ts)
      if (t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
}

EkFwdParams fwd_params(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &pk,
                       const std::optional<Tensor> &pv, const Tensor &gate32, const std::optional<Tensor> &sim,
                       const Tensor &o, const Tensor &lse, const Tensor &ke, bool causal, double softmax_scale,
                       double prompt_scale, int64_t bypass) {
  EkFwdParams p{};
  const Tensor &s = sim.has_value() ? *sim : k;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.s = s.data_ptr();
  p.pk = pk.data_ptr();
  p.pv = pv.has_value() ? pv->data_ptr() : pk.data_ptr();
  p.gate = gate32.data_ptr<float>();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.ke = ke.numel() > 0 ? ke.data_ptr() : nullptr;
  p.q_st = strides(q);
  p.k_st = strides(k);
  p.v_st = strides(v);
  p.s_st = strides(s);
  p.pk_st = strides(pk);
  p.pv_st = pv.has_value() ? strides(*pv) : p.pk_st;
  p.o_st = strides(o);
  p.ke_st = ke.numel() > 0 ? strides(ke) : EkStrides{0, 0, 0};
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.q_len = q.size(2);
  p.head_dim = q.size(3);
  p.kv_heads = k.size(1);
  p.kv_len = k.size(2);
  p.num_prompts = pk.size(-2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.prompt_scale = static_cast<float>(prompt_scale);
  p.causal = causal;
  p.bypass = static_cast<int>(bypass);
  p.sim_is_k = !sim.has_value();
  p.dtype = q.scalar_type() == at::kHalf ? EK_FLOAT16 : EK_BFLOAT16;
  return p;
}

std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &pk,
                                       const std::optional<Tensor> &pv, const Tensor &gate,
                                       const std::optional<Tensor> &sim, bool causal, double softmax_scale,
                                       double prompt_scale, int64_t bypass, bool deterministic, bool poison) {
  (void)deterministic;  // carried for the backward (autograd context)
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor o = at::empty_like(q);  // keeps q's layout: a (B, M, H, d) view gets a (B, M, H, d) output
  const Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const Tensor ke = bypass == EK_EXCITOR ? at::empty(k.sizes(), k.options()) : at::empty({0}, k.options());
  maybe_poison(poison, {o, lse});
  const Tensor gate32 = gate.to(at::kFloat).contiguous();
  const EkFwdParams p = fwd_params(q, k, v, pk, pv, gate32, sim, o, lse, ke, causal, softmax_scale, prompt_scale, bypass);
  check(ek_forward(&p, c10::cuda::getCurrentCUDAStream()), "forward");
  return {o, lse, ke};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd(
    const Tensor &dout, const Tensor &q, const Tensor &k, const Tensor &v, const Tensor &pk,
    const std::optional<Tensor> &pv, const Tensor &gate, const std::optional<Tensor> &sim, const Tensor &o,
    const Tensor &lse, const Tensor &ke, bool causal, double softmax_scale, double prompt_scale, int64_t bypass,
    bool deterministic, bool poison) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), M = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), N = k.size(2), P = pk.size(-2), groups = Hq / Hkv;
  const bool per_sample = pk.dim() == 4;
  const Tensor gate32 = gate.to(at::kFloat).contiguous();
  const Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const Tensor dsim = sim.has_value() ? at::empty_like(*sim) : at::empty({0}, q.options());
  maybe_poison(poison, {dq, dk, dv, dsim});
  const Tensor delta = at::empty({B, Hq, M}, q.options().dtype(at::kFloat));

  // Prompt/gate gradient buffers, index [tile, batch, kv head, group member, prompt, d] and [tile, batch, q head].
  // Excitor sums come from key-tile CTAs, adapter sums from query-tile CTAs (one per query head).
  const int64_t tiles = bypass == EK_EXCITOR ? (N + EK_TILE - 1) / EK_TILE : (M + EK_TILE - 1) / EK_TILE;
  const int64_t members = bypass == EK_EXCITOR ? 1 : groups;
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor dpk_buf, dg_buf;
  EkBwdParams bp{};
  if (deterministic) {  // one slice per CTA: every address gets exactly one add, summed below in a fixed order
    dpk_buf = at::zeros({tiles, B, Hkv, members, P, d}, f32);
    dg_buf = at::zeros({tiles, B, Hq}, f32);
    bp.dp_tile = dpk_buf.stride(0);
    bp.dp_b = dpk_buf.stride(1);
    bp.dp_member = dpk_buf.stride(3);
    bp.dg_tile = dg_buf.stride(0);
    bp.dg_b = dg_buf.stride(1);
  } else {  // atomics into one (P, d) block per prompt set
    dpk_buf = at::zeros({1, per_sample ? B : 1, Hkv, 1, P, d}, f32);
    dg_buf = at::zeros({1, 1, Hq}, f32);
    bp.dp_b = per_sample ? dpk_buf.stride(1) : 0;
  }
  bp.dp_h = dpk_buf.stride(2);
  bp.dp_p = dpk_buf.stride(4);
  const Tensor dpv_buf = bypass == EK_ADAPTER ? at::zeros_like(dpk_buf) : dpk_buf;

  bp.f = fwd_params(q, k, v, pk, pv, gate32, sim, o, lse, ke, causal, softmax_scale, prompt_scale, bypass);
  const Tensor dout_c = dout.stride(-1) == 1 ? dout : dout.contiguous();
  bp.dout = dout_c.data_ptr();
  bp.delta = delta.data_ptr<float>();
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  bp.dsim = dsim.numel() > 0 ? dsim.data_ptr() : nullptr;
  bp.do_st = strides(dout_c);
  bp.dq_st = strides(dq);
  bp.dk_st = strides(dk);
  bp.dv_st = strides(dv);
  bp.ds_st = dsim.numel() > 0 ? strides(dsim) : EkStrides{0, 0, 0};
  bp.dpk = dpk_buf.data_ptr<float>();
  bp.dpv = dpv_buf.data_ptr<float>();
  bp.dgate = dg_buf.data_ptr<float>();
  check(ek_backward(&bp, c10::cuda::getCurrentCUDAStream()), "backward");

  auto prompt_grad = [&](const Tensor &buf) {  // -> pk's shape: sum tiles and group members (and batch if shared)
    Tensor g = buf.sum({0, 3});
    return (per_sample ? g : g.sum(0)).to(pk.scalar_type());
  };
  const Tensor dpk = prompt_grad(dpk_buf);
  const Tensor dpv = bypass == EK_ADAPTER ? prompt_grad(dpv_buf) : at::empty({0}, pk.options());
  const Tensor dgate = dg_buf.sum({0, 1}).to(gate.scalar_type());
  return {dq, dk, dv, dpk, dpv, dgate, dsim};
}

}  // namespace

TORCH_LIBRARY(excitor_kernels_cuda, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor pk, Tensor? pv, Tensor gate, Tensor? sim, bool causal, "
      "float softmax_scale, float prompt_scale, int bypass, bool deterministic, bool poison) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor pk, Tensor? pv, Tensor gate, Tensor? sim, Tensor o, "
      "Tensor lse, Tensor ke, bool causal, float softmax_scale, float prompt_scale, int bypass, bool deterministic, "
      "bool poison) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(excitor_kernels_cuda, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
}

// An importable (empty) Python module: importing excitor_kernels._C runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
