// Forward kernels (docs/contract.md), sm_80+ mma.sync path.
//
// Excitor: one launch rebuilds every key once per key/value head,
//   a[j, n] = softmax_n(prompt_scale <s_j, pk_n>),  ke_j = sum_n a[j, n] pk_n - mean_n pk_n   (B x Hkv x N x d)
// and the attention launch forms k'_j = k_j + gate[h] ke_j while it stages each key tile in shared
// memory, so no (B, Hq, N, d) tensor and no M x N tensor ever reaches global memory.
// Adapter: the attention launch adds gate[h] softmax_n(softmax_scale <q_i, pk_n>) pv_n to each row.
// Scores are in base 2 (qk_scale = softmax_scale log2 e); lse_i = max_j + log2 sum_j exp2(...), +inf for a
// row that sees no key, so that the backward's exp2(score - lse) is 0 there.
#include "common.cuh"

namespace ek {

// One CTA per (64-key tile, batch * kv head): ke for those keys, written in the input dtype. Shared memory: the
// key tile, the prompt tile, the D prompt column means (float32).
template <class T, int D>
constexpr int reconstruct_smem_bytes() { return 2 * tile_bytes<T, D>() + D * int(sizeof(float)); }

template <class T, int D>
__global__ void __launch_bounds__(kThreads) reconstruct_keys_kernel(EkFwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T *s_x = reinterpret_cast<T *>(smem);
  T *s_pk = s_x + kTile * pitch<D>();
  const int n0 = blockIdx.y * kTile;
  const int b = blockIdx.x / p.kv_heads, g = blockIdx.x % p.kv_heads;
  const Frag f;

  load_tile<T, D>(s_x, static_cast<const T *>(p.s) + b * p.s_st.b + g * p.s_st.h + n0 * p.s_st.row, p.s_st.row,
                  p.kv_len - n0);
  load_tile<T, D>(s_pk, static_cast<const T *>(p.pk) + b * p.pk_st.b + g * p.pk_st.h, p.pk_st.row, p.num_prompts);
  __syncthreads();
  // centre on c = mean_n pk_n (docs/design.md): every key of head h moves by gate[h] c, which no softmax sees.
  // The D column means are summed once per CTA, a column per thread, into shared memory after the two tiles.
  float *s_c = reinterpret_cast<float *>(s_pk + kTile * pitch<D>());
  for (int col = threadIdx.x; col < D; col += kThreads) {
    float c = 0.f;
    for (int n = 0; n < p.num_prompts; ++n) c += to_float(s_pk[n * pitch<D>() + col]);
    s_c[col] = c / p.num_prompts;
  }
  __syncthreads();
  float ke[D / 8][4], a[kTile / 8][4];
  prompt_mix<T, D>(ke, a, s_x, s_pk, s_pk, p.num_prompts, p.prompt_scale * kLog2e, f);
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float c = s_c[f.col(nb, e)];
      ke[nb][e] -= c;
      ke[nb][e + 2] -= c;
    }
  store_global<T>(static_cast<T *>(p.ke) + b * p.ke_st.b + g * p.ke_st.h + n0 * p.ke_st.row, p.ke_st.row,
                  p.kv_len - n0, ke, f);
}

// One CTA per (batch * query head, 64-query tile): flash-attention online softmax over the key tiles.
template <class T, int D, int BYPASS>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(EkFwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int LD = pitch<D>();
  T *s_q = reinterpret_cast<T *>(smem);
  T *s_k = s_q + kTile * LD;
  T *s_v = s_k + kTile * LD;
  const int bh = blockIdx.x, b = bh / p.q_heads, h = bh % p.q_heads, g = h / (p.q_heads / p.kv_heads);
  const int start_m = blockIdx.y * kTile, M = p.q_len, N = p.kv_len, shift = N - M;
  const float qk_scale = p.softmax_scale * kLog2e;
  const float gate_h = p.gate[h];
  const Frag f;

  load_tile<T, D>(s_q, static_cast<const T *>(p.q) + b * p.q_st.b + h * p.q_st.h + start_m * p.q_st.row, p.q_st.row,
                  M - start_m);
  const T *k_base = static_cast<const T *>(p.k) + b * p.k_st.b + g * p.k_st.h;
  const T *v_base = static_cast<const T *>(p.v) + b * p.v_st.b + g * p.v_st.h;
  const T *ke_base = static_cast<const T *>(p.ke) + b * p.ke_st.b + g * p.ke_st.h;

  float acc[D / 8][4];
  zero(acc);
  float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.f, 0.f};
  const int hi = key_end(start_m, M, N, p.causal);
  for (int n0 = 0; n0 < hi; n0 += kTile) {
    __syncthreads();  // the previous tile's readers are done
    if constexpr (BYPASS == EK_EXCITOR)  // k' = k + gate[h] ke, rounded once to T
      load_tile<T, D>(s_k, k_base + n0 * p.k_st.row, p.k_st.row, N - n0, ke_base + n0 * p.ke_st.row, p.ke_st.row, gate_h);
    else
      load_tile<T, D>(s_k, k_base + n0 * p.k_st.row, p.k_st.row, N - n0);
    load_tile<T, D>(s_v, v_base + n0 * p.v_st.row, p.v_st.row, N - n0);
    __syncthreads();

    float s[kTile / 8][4];
    zero(s);
    gemm<false, false, kTile / 8, D / 16>(s, s_q, LD, f.m0, s_k, LD);
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int i = start_m + f.row(2 * h2);
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
        for (int e = 2 * h2; e < 2 * h2 + 2; ++e) {
          const int j = n0 + f.col(nb, e);
          const bool visible = j < N && (!p.causal || j <= i + shift);
          s[nb][e] = visible ? s[nb][e] * qk_scale : -CUDART_INF_F;
          mx = fmaxf(mx, s[nb][e]);
        }
      // a row that has seen nothing yet keeps max 0 so exp2 never meets (-inf) - (-inf); its l stays 0
      const float m_new = fmaxf(m_run[h2], quad_max(mx));
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
      const float alpha = exp2f(m_run[h2] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
        for (int e = 2 * h2; e < 2 * h2 + 2; ++e) {
          s[nb][e] = exp2f(s[nb][e] - m_use);
          sum += s[nb][e];
        }
      l_run[h2] = l_run[h2] * alpha + quad_sum(sum);
      m_run[h2] = m_use;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        acc[nb][2 * h2] *= alpha;
        acc[nb][2 * h2 + 1] *= alpha;
      }
    }
    uint32_t pa[kTile / 16][4];
    to_a<T>(pa, s);
    gemm_reg<true, D / 8, kTile / 16>(acc, pa, s_v, LD);  // acc += p v
  }

  float inv_l[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) inv_l[h2] = l_run[h2] == 0.f ? 0.f : 1.f / l_run[h2];  // empty rows output 0
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nb][e] *= inv_l[e >> 1];

  if constexpr (BYPASS == EK_ADAPTER) {  // o_i += gate[h] sum_n softmax_n(softmax_scale <q_i, pk_n>) pv_n
    __syncthreads();
    load_tile<T, D>(s_k, static_cast<const T *>(p.pk) + b * p.pk_st.b + g * p.pk_st.h, p.pk_st.row, p.num_prompts);
    load_tile<T, D>(s_v, static_cast<const T *>(p.pv) + b * p.pv_st.b + g * p.pv_st.h, p.pv_st.row, p.num_prompts);
    __syncthreads();
    float op[D / 8][4], ap[kTile / 8][4];
    prompt_mix<T, D>(op, ap, s_q, s_k, s_v, p.num_prompts, qk_scale, f);
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nb][e] += gate_h * op[nb][e];
  }

  store_global<T>(static_cast<T *>(p.o) + b * p.o_st.b + h * p.o_st.h + start_m * p.o_st.row, p.o_st.row, M - start_m,
                  acc, f);
  if ((f.lane & 3) == 0)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int i = start_m + f.row(2 * h2);
      if (i < M)
        p.lse[int64_t(bh) * M + i] = l_run[h2] == 0.f ? CUDART_INF_F : m_run[h2] + log2f(l_run[h2]);
    }
}

}  // namespace ek

extern "C" int ek_forward(const EkFwdParams *p, cudaStream_t stream) {
  using namespace ek;
  return ek::dispatch(*p, [&](auto tag, auto dim, auto op) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value, BYPASS = decltype(op)::value;
    if constexpr (BYPASS == EK_EXCITOR) {
      const dim3 grid(p->batch * p->kv_heads, cdiv(p->kv_len, kTile));
      const cudaError_t err = launch(reconstruct_keys_kernel<T, D>, grid, reconstruct_smem_bytes<T, D>(), stream, *p);
      if (err != cudaSuccess) return err;
    }
    const dim3 grid(p->batch * p->q_heads, cdiv(p->q_len, kTile));
    return launch(attention_fwd_kernel<T, D, BYPASS>, grid, 3 * tile_bytes<T, D>(), stream, *p);
  });
}
