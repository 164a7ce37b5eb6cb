// Backward kernels (docs/contract.md), sm_80+ mma.sync path. Two launches:
//
// 1. delta_i = <do_i, o_i> (adapter: minus gate[h] <do_i, op_i>, the prompt part of o), so that the token
//    softmax backward is ds = p * (do v^T - delta). Where gate[h] op_i is not finite the difference cannot give
//    the token output back: such a tile recomputes it from q, k, v and lse (token_output, a rare branch).
// 2. One launch, two kinds of CTA (the first ones own key tiles, the rest query tiles):
//    key tile j.. of kv head g, looping over the query heads h of g and their query tiles:
//        dv_j += sum_i p[i, j] do_i,   dk'[h, j] = softmax_scale sum_i ds[i, j] q_i   (k' rebuilt from ke)
//        dk_j = sum_h dk'[h, j],  dke_j = sum_h gate[h] dk'[h, j],  dgate[h] += sum_j <dk'[h, j], ke_j - c>
//      then the Excitor chain rule through ke = a pk, a = softmax(prompt_scale s pk^T) for that tile:
//        da = dke pk^T,  dz = a (da - rowsum(a da)),  dsim = prompt_scale dz pk  (added to dk when s = k),
//        dpk += a^T dke + prompt_scale dz^T s
//    query tile i.. of query head h:  dq_i = softmax_scale sum_j ds[i, j] k'[h, j]  plus, for the adapter,
//        every prompt gradient (the prompt softmax belongs to the query row).
// Gate and prompt gradients leave the CTA through float32 atomics into the buffers described in
// excitor_attention.h (one slice per CTA in deterministic mode).
#include "common.cuh"

namespace ek {

template <class T>
__device__ __forceinline__ const T *at(const void *base, const EkStrides &st, int b, int h, int row) {
  return static_cast<const T *>(base) + b * st.b + h * st.h + int64_t(row) * st.row;
}

template <class T>
__device__ __forceinline__ T *at_mut(void *base, const EkStrides &st, int b, int h, int row) {
  return static_cast<T *>(base) + b * st.b + h * st.h + int64_t(row) * st.row;
}

// The token attention's output of the CTA's query rows, ot_i = sum_j exp2(s_ij - lse_i) v_j, into ot (kTile x D
// floats of shared memory), in float32 with plain loads: the Adapter's delta takes it where the gated prompt term
// is not finite (a NaN or Inf in the prompts or the gate), so that it reaches no key's gradient. Two threads per
// row, each owning half of the columns; s_q holds the tile's queries.
template <class T, int D>
__device__ void token_output(float *ot, const T *s_q, const EkFwdParams &p, int b, int g, int bh, int start_m) {
  const int r = threadIdx.x >> 1, c0 = (threadIdx.x & 1) * (D / 2), i = start_m + r;
  const int M = p.q_len, N = p.kv_len;
  float *row = ot + r * D;
  for (int c = c0; c < c0 + D / 2; ++c) row[c] = 0.f;
  if (i >= M) return;
  const float lse = p.lse[int64_t(bh) * M + i], qk_scale = p.softmax_scale * kLog2e;
  const int hi = p.causal ? min(N, i + N - M + 1) : N;  // keys j <= i + N - M (bottom-right)
  for (int j = 0; j < hi; ++j) {
    const T *k = at<T>(p.k, p.k_st, b, g, j), *v = at<T>(p.v, p.v_st, b, g, j);
    float s = 0.f;
    for (int c = 0; c < D; ++c) s += to_float(s_q[r * pitch<D>() + c]) * to_float(k[c]);
    const float pij = exp2f(s * qk_scale - lse);
    for (int c = c0; c < c0 + D / 2; ++c) row[c] += pij * to_float(v[c]);
  }
}

// One CTA per (batch * query head, 64-query tile).
template <class T, int D, int BYPASS>
__global__ void __launch_bounds__(kThreads) delta_kernel(EkBwdParams bp) {
  extern __shared__ __align__(16) unsigned char smem[];
  const EkFwdParams &p = bp.f;
  const int bh = blockIdx.x, b = bh / p.q_heads, h = bh % p.q_heads, g = h / (p.q_heads / p.kv_heads);
  const int start_m = blockIdx.y * kTile, M = p.q_len;
  const Frag f;
  const float gate_h = p.gate[h];

  float op[D / 8][4];
  zero(op);
  const float *ot = nullptr;  // the recomputed token output, when the prompt term is not finite
  if constexpr (BYPASS == EK_ADAPTER) {
    T *s_q = reinterpret_cast<T *>(smem);
    T *s_pk = s_q + kTile * pitch<D>();
    T *s_pv = s_pk + kTile * pitch<D>();
    load_tile<T, D>(s_q, at<T>(p.q, p.q_st, b, h, start_m), p.q_st.row, M - start_m);
    load_tile<T, D>(s_pk, at<T>(p.pk, p.pk_st, b, g, 0), p.pk_st.row, p.num_prompts);
    load_tile<T, D>(s_pv, at<T>(p.pv, p.pv_st, b, g, 0), p.pv_st.row, p.num_prompts);
    __syncthreads();
    float ap[kTile / 8][4];
    prompt_mix<T, D>(op, ap, s_q, s_pk, s_pv, p.num_prompts, p.softmax_scale * kLog2e, f);
    bool bad = false;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) bad |= !isfinite(gate_h * op[nb][e]);
    static_assert(2 * tile_bytes<T, D>() >= kTile * D * int(sizeof(float)), "token output over the prompt tiles");
    if (__syncthreads_or(bad)) {  // the prompt tiles have been read: their space holds the float32 token output
      float *s_ot = reinterpret_cast<float *>(s_pk);
      token_output<T, D>(s_ot, s_q, p, b, g, bh, start_m);
      __syncthreads();
      ot = s_ot;
    }
  }
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int i = start_m + f.row(2 * h2);
    float sum = 0.f;
    if (i < M) {
      const T *o = at<T>(p.o, p.o_st, b, h, i), *dout = at<T>(bp.dout, bp.do_st, b, h, i);
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
        for (int e = 2 * h2; e < 2 * h2 + 2; ++e) {
          const int c = f.col(nb, e);
          const float tok = ot ? ot[f.row(e) * D + c] : to_float(o[c]) - gate_h * op[nb][e];
          sum += to_float(dout[c]) * tok;
        }
    }
    sum = quad_sum(sum);
    if (i < M && (f.lane & 3) == 0) bp.delta[int64_t(bh) * M + i] = sum;
  }
}

// Shared memory of the key-tile CTAs: 5 tiles, two float32 spill areas for the (dk, dke) accumulators,
// lse / delta of the current query tile and a reduction scratch.
template <class T, int D>
constexpr int key_smem_bytes() {
  return 5 * tile_bytes<T, D>() + 2 * (D / 2) * kThreads * 4 + (2 * kTile + kThreads / 32) * 4;
}
// Query-tile CTAs: 6 tiles and a reduction scratch.
template <class T, int D>
constexpr int query_smem_bytes() { return 6 * tile_bytes<T, D>() + (kThreads / 32) * 4; }

template <class T, int D, int BYPASS>
__device__ __forceinline__ void bwd_key_tile(const EkBwdParams &bp, int pid, unsigned char *smem) {
  constexpr int LD = pitch<D>(), NB = D / 8, NACC = NB * 4;
  const EkFwdParams &p = bp.f;
  T *s_k = reinterpret_cast<T *>(smem);  // k'[h]; dke (as T) in the chain rule
  T *s_v = s_k + kTile * LD;             // v; a^T source in the chain rule
  T *s_q = s_v + kTile * LD;             // q tile; s in the chain rule
  T *s_do = s_q + kTile * LD;            // do tile; pk in the chain rule
  T *s_x = s_do + kTile * LD;            // ke; prompt_scale dz in the chain rule
  float *acc_k = reinterpret_cast<float *>(s_x + kTile * LD);  // [NACC][kThreads]: this thread's dk
  float *acc_ke = acc_k + NACC * kThreads;                      // and dke elements
  float *s_lse = acc_ke + NACC * kThreads;
  float *s_delta = s_lse + kTile;
  float *red = s_delta + kTile;

  const int kv_tiles = cdiv(p.kv_len, kTile);
  const int tile = pid % kv_tiles, bg = pid / kv_tiles, b = bg / p.kv_heads, g = bg % p.kv_heads;
  const int groups = p.q_heads / p.kv_heads;
  const int n0 = tile * kTile, M = p.q_len, N = p.kv_len, shift = N - M;
  const float qk_scale = p.softmax_scale * kLog2e;
  const Frag f;

  load_tile<T, D>(s_v, at<T>(p.v, p.v_st, b, g, n0), p.v_st.row, N - n0);
  if constexpr (BYPASS == EK_EXCITOR) {
    load_tile<T, D>(s_x, at<T>(p.ke, p.ke_st, b, g, n0), p.ke_st.row, N - n0);  // centred: no cancelling dgate
  }
  for (int x = 0; x < NACC; ++x) acc_k[x * kThreads + threadIdx.x] = acc_ke[x * kThreads + threadIdx.x] = 0.f;

  // query tiles that see any key of this tile: i >= n0 - shift when causal
  const int m_first = p.causal ? max(n0 - shift, 0) / kTile * kTile : 0;
  float dv[NB][4];
  zero(dv);
  for (int hh = 0; hh < groups; ++hh) {
    const int h = g * groups + hh;
    const int64_t bh = int64_t(b) * p.q_heads + h;
    const float gate_h = p.gate[h];
    __syncthreads();
    if constexpr (BYPASS == EK_EXCITOR)
      load_tile<T, D>(s_k, at<T>(p.k, p.k_st, b, g, n0), p.k_st.row, N - n0, at<T>(p.ke, p.ke_st, b, g, n0),
                      p.ke_st.row, gate_h);
    else if (hh == 0)
      load_tile<T, D>(s_k, at<T>(p.k, p.k_st, b, g, n0), p.k_st.row, N - n0);

    float dkp[NB][4];
    zero(dkp);
    for (int m_start = m_first; m_start < M; m_start += kTile) {
      __syncthreads();
      load_tile<T, D>(s_q, at<T>(p.q, p.q_st, b, h, m_start), p.q_st.row, M - m_start);
      load_tile<T, D>(s_do, at<T>(bp.dout, bp.do_st, b, h, m_start), bp.do_st.row, M - m_start);
      for (int r = threadIdx.x; r < kTile; r += kThreads) {
        const bool valid = m_start + r < M;  // padded rows: p = exp2(s - inf) = 0
        s_lse[r] = valid ? p.lse[bh * M + m_start + r] : CUDART_INF_F;
        s_delta[r] = valid ? bp.delta[bh * M + m_start + r] : 0.f;
      }
      __syncthreads();

      float pt[kTile / 8][4], dpt[kTile / 8][4];  // p^T, dp^T: rows = this warp's keys, columns = queries
      zero(pt);
      gemm<false, false, kTile / 8, D / 16>(pt, s_k, LD, f.m0, s_q, LD);
      zero(dpt);
      gemm<false, false, kTile / 8, D / 16>(dpt, s_v, LD, f.m0, s_do, LD);
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = n0 + f.row(e), ic = f.col(nb, e), i = m_start + ic;
          const bool visible = j < N && (!p.causal || j <= i + shift);
          pt[nb][e] = visible ? exp2f(pt[nb][e] * qk_scale - s_lse[ic]) : 0.f;
          dpt[nb][e] = pt[nb][e] * (dpt[nb][e] - s_delta[ic]);  // ds^T
        }
      uint32_t af[kTile / 16][4];
      to_a<T>(af, pt);
      gemm_reg<true, NB, kTile / 16>(dv, af, s_do, LD);  // dv += p^T do
      to_a<T>(af, dpt);
      gemm_reg<true, NB, kTile / 16>(dkp, af, s_q, LD);  // dk' += ds^T q
    }

    float dg = 0.f;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float d = dkp[nb][e] * p.softmax_scale;  // dk'[h]
        const int x = (nb * 4 + e) * kThreads + threadIdx.x;
        acc_k[x] += d;
        if constexpr (BYPASS == EK_EXCITOR) {
          acc_ke[x] += gate_h * d;
          dg += d * to_float(s_x[f.row(e) * LD + f.col(nb, e)]);
        }
      }
    if constexpr (BYPASS == EK_EXCITOR) {
      dg = block_sum(dg, red);
      if (threadIdx.x == 0) atomicAdd(bp.dgate + tile * bp.dg_tile + b * bp.dg_b + h, dg);
    }
  }

  store_global<T>(at_mut<T>(bp.dv, bp.dv_st, b, g, n0), bp.dv_st.row, N - n0, dv, f);
  if constexpr (BYPASS == EK_EXCITOR) {
    const float ps = p.prompt_scale;
    float dke[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) dke[nb][e] = acc_ke[(nb * 4 + e) * kThreads + threadIdx.x];
    __syncthreads();  // every warp is done with k', q, do
    store_shared<T>(s_k, LD, dke, 1.f, f);
    load_tile<T, D>(s_q, at<T>(p.s, p.s_st, b, g, n0), p.s_st.row, N - n0);
    load_tile<T, D>(s_do, at<T>(p.pk, p.pk_st, b, g, 0), p.pk_st.row, p.num_prompts);
    __syncthreads();
    float a[kTile / 8][4], dz[kTile / 8][4];  // rows = this warp's keys, columns = prompts
    zero(a);
    gemm<false, false, kTile / 8, D / 16>(a, s_q, LD, f.m0, s_do, LD);
    prompt_softmax(a, p.num_prompts, ps * kLog2e, f);
    zero(dz);
    gemm<false, false, kTile / 8, D / 16>(dz, s_k, LD, f.m0, s_do, LD);  // da = dke pk^T
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float ada = 0.f;
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
        for (int e = 2 * h2; e < 2 * h2 + 2; ++e) ada += a[nb][e] * dz[nb][e];
      ada = quad_sum(ada);
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
        for (int e = 2 * h2; e < 2 * h2 + 2; ++e) dz[nb][e] = a[nb][e] * (dz[nb][e] - ada);
    }
    // dsim = prompt_scale dz pk (keys j >= N have dke = 0, hence dz = 0)
    float dsim[NB][4];
    zero(dsim);
    uint32_t af[kTile / 16][4];
    to_a<T>(af, dz);
    gemm_reg<true, NB, kTile / 16>(dsim, af, s_do, LD);
    if (p.sim_is_k) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_k[(nb * 4 + e) * kThreads + threadIdx.x] += ps * dsim[nb][e];
    } else {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) dsim[nb][e] *= ps;
      store_global<T>(at_mut<T>(bp.dsim, bp.ds_st, b, g, n0), bp.ds_st.row, N - n0, dsim, f);
    }
    // dpk = a^T dke + prompt_scale dz^T s: rows = this warp's prompts; a and dz go through shared memory
    store_shared<T>(s_v, LD, a, 1.f, f);
    store_shared<T>(s_x, LD, dz, ps, f);
    __syncthreads();
    float dpk[NB][4];
    zero(dpk);
    gemm<true, true, NB, kTile / 16>(dpk, s_v, LD, f.m0, s_k, LD);
    gemm<true, true, NB, kTile / 16>(dpk, s_x, LD, f.m0, s_q, LD);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = f.row(e);
        if (n < p.num_prompts)
          atomicAdd(bp.dpk + tile * bp.dp_tile + b * bp.dp_b + g * bp.dp_h + n * bp.dp_p + f.col(nb, e), dpk[nb][e]);
      }
  }
  float dk[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nb][e] = acc_k[(nb * 4 + e) * kThreads + threadIdx.x];
  store_global<T>(at_mut<T>(bp.dk, bp.dk_st, b, g, n0), bp.dk_st.row, N - n0, dk, f);
}

template <class T, int D, int BYPASS>
__device__ __forceinline__ void bwd_query_tile(const EkBwdParams &bp, int pid, unsigned char *smem) {
  constexpr int LD = pitch<D>(), NB = D / 8;
  const EkFwdParams &p = bp.f;
  T *s_q = reinterpret_cast<T *>(smem);
  T *s_do = s_q + kTile * LD;
  T *s_k = s_do + kTile * LD;  // k'[h]; pk for the adapter
  T *s_v = s_k + kTile * LD;   // v; pv for the adapter
  T *s_x = s_v + kTile * LD;   // adapter: softmax_scale dzp (queries x prompts)
  T *s_y = s_x + kTile * LD;   // adapter: ap
  float *red = reinterpret_cast<float *>(s_y + kTile * LD);

  const int q_tiles = cdiv(p.q_len, kTile);
  const int tile = pid % q_tiles, bh = pid / q_tiles, b = bh / p.q_heads, h = bh % p.q_heads;
  const int groups = p.q_heads / p.kv_heads, g = h / groups;
  const int start_m = tile * kTile, M = p.q_len, N = p.kv_len, shift = N - M;
  const float qk_scale = p.softmax_scale * kLog2e;
  const float gate_h = p.gate[h];
  const Frag f;

  load_tile<T, D>(s_q, at<T>(p.q, p.q_st, b, h, start_m), p.q_st.row, M - start_m);
  load_tile<T, D>(s_do, at<T>(bp.dout, bp.do_st, b, h, start_m), bp.do_st.row, M - start_m);
  float lse[2], delta[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int i = start_m + f.row(2 * h2);
    lse[h2] = i < M ? p.lse[int64_t(bh) * M + i] : CUDART_INF_F;
    delta[h2] = i < M ? bp.delta[int64_t(bh) * M + i] : 0.f;
  }

  float dq[NB][4];
  zero(dq);
  const int hi = key_end(start_m, M, N, p.causal);
  for (int n0 = 0; n0 < hi; n0 += kTile) {
    __syncthreads();
    if constexpr (BYPASS == EK_EXCITOR)
      load_tile<T, D>(s_k, at<T>(p.k, p.k_st, b, g, n0), p.k_st.row, N - n0, at<T>(p.ke, p.ke_st, b, g, n0),
                      p.ke_st.row, gate_h);
    else
      load_tile<T, D>(s_k, at<T>(p.k, p.k_st, b, g, n0), p.k_st.row, N - n0);
    load_tile<T, D>(s_v, at<T>(p.v, p.v_st, b, g, n0), p.v_st.row, N - n0);
    __syncthreads();
    float s[kTile / 8][4], dp[kTile / 8][4];
    zero(s);
    gemm<false, false, kTile / 8, D / 16>(s, s_q, LD, f.m0, s_k, LD);
    zero(dp);
    gemm<false, false, kTile / 8, D / 16>(dp, s_do, LD, f.m0, s_v, LD);
#pragma unroll
    for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = start_m + f.row(e), j = n0 + f.col(nb, e);
        const bool visible = j < N && (!p.causal || j <= i + shift);
        const float pij = visible ? exp2f(s[nb][e] * qk_scale - lse[e >> 1]) : 0.f;
        s[nb][e] = pij * (dp[nb][e] - delta[e >> 1]);  // ds
      }
    uint32_t af[kTile / 16][4];
    to_a<T>(af, s);
    gemm_reg<true, NB, kTile / 16>(dq, af, s_k, LD);  // dq += ds k'
  }
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nb][e] *= p.softmax_scale;

  if constexpr (BYPASS == EK_ADAPTER) {
    // o_i += gate[h] op_i, op = ap pv, ap = softmax(softmax_scale q pk^T). Padded query rows have do = 0,
    // so their (non-zero) ap contributes nothing below.
    __syncthreads();
    load_tile<T, D>(s_k, at<T>(p.pk, p.pk_st, b, g, 0), p.pk_st.row, p.num_prompts);
    load_tile<T, D>(s_v, at<T>(p.pv, p.pv_st, b, g, 0), p.pv_st.row, p.num_prompts);
    __syncthreads();
    float op[NB][4], ap[kTile / 8][4];
    prompt_mix<T, D>(op, ap, s_q, s_k, s_v, p.num_prompts, qk_scale, f);
    float dg = 0.f;  // dgate[h] = sum_i <do_i, op_i>
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) dg += to_float(s_do[f.row(e) * LD + f.col(nb, e)]) * op[nb][e];
    dg = block_sum(dg, red);
    if (threadIdx.x == 0) atomicAdd(bp.dgate + tile * bp.dg_tile + b * bp.dg_b + h, dg);

    float dz[kTile / 8][4];  // dap = gate do pv^T, then dzp = ap (dap - rowsum(ap dap))
    zero(dz);
    gemm<false, false, kTile / 8, D / 16>(dz, s_do, LD, f.m0, s_v, LD);
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float ada = 0.f;
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
        for (int e = 2 * h2; e < 2 * h2 + 2; ++e) ada += ap[nb][e] * gate_h * dz[nb][e];
      ada = quad_sum(ada);
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
        for (int e = 2 * h2; e < 2 * h2 + 2; ++e) dz[nb][e] = p.softmax_scale * ap[nb][e] * (gate_h * dz[nb][e] - ada);
    }
    uint32_t af[kTile / 16][4];
    to_a<T>(af, dz);
    gemm_reg<true, NB, kTile / 16>(dq, af, s_k, LD);  // dq += softmax_scale dzp pk
    // dpk = softmax_scale dzp^T q and dpv = gate ap^T do: rows = this warp's prompts
    store_shared<T>(s_x, LD, dz, 1.f, f);
    store_shared<T>(s_y, LD, ap, 1.f, f);
    __syncthreads();
    float dpk[NB][4], dpv[NB][4];
    zero(dpk);
    gemm<true, true, NB, kTile / 16>(dpk, s_x, LD, f.m0, s_q, LD);
    zero(dpv);
    gemm<true, true, NB, kTile / 16>(dpv, s_y, LD, f.m0, s_do, LD);
    const int64_t base = tile * bp.dp_tile + b * bp.dp_b + g * bp.dp_h + (h - g * groups) * bp.dp_member;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = f.row(e);
        if (n < p.num_prompts) {
          const int64_t x = base + n * bp.dp_p + f.col(nb, e);
          atomicAdd(bp.dpk + x, dpk[nb][e]);
          atomicAdd(bp.dpv + x, gate_h * dpv[nb][e]);
        }
      }
  }
  store_global<T>(at_mut<T>(bp.dq, bp.dq_st, b, h, start_m), bp.dq_st.row, M - start_m, dq, f);
}

template <class T, int D, int BYPASS>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(EkBwdParams bp, int num_key_ctas) {
  extern __shared__ __align__(16) unsigned char smem[];
  if (int(blockIdx.x) < num_key_ctas) bwd_key_tile<T, D, BYPASS>(bp, blockIdx.x, smem);
  else bwd_query_tile<T, D, BYPASS>(bp, blockIdx.x - num_key_ctas, smem);
}

}  // namespace ek

extern "C" int ek_backward(const EkBwdParams *bp, cudaStream_t stream) {
  using namespace ek;
  const EkFwdParams &p = bp->f;
  return ek::dispatch(p, [&](auto tag, auto dim, auto op) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value, BYPASS = decltype(op)::value;
    const int q_tiles = cdiv(p.q_len, kTile);
    const int delta_smem = BYPASS == EK_ADAPTER ? 3 * tile_bytes<T, D>() : 0;
    cudaError_t err = launch(delta_kernel<T, D, BYPASS>, dim3(p.batch * p.q_heads, q_tiles), delta_smem, stream, *bp);
    if (err != cudaSuccess) return err;
    const int num_key_ctas = cdiv(p.kv_len, kTile) * p.batch * p.kv_heads;
    const dim3 grid(num_key_ctas + q_tiles * p.batch * p.q_heads);
    constexpr int smem = key_smem_bytes<T, D>() > query_smem_bytes<T, D>() ? key_smem_bytes<T, D>()
                                                                            : query_smem_bytes<T, D>();
    return launch(attention_bwd_kernel<T, D, BYPASS>, grid, smem, stream, *bp, num_key_ctas);
  });
}
