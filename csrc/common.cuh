// Warp-level tensor-core building blocks shared by the forward and backward kernels (sm_80+).
//
// Every CTA has 4 warps; every tile has EK_TILE = 64 rows and lives in shared memory as a row-major
// array of T with a row pitch of COLS + 8 elements (16 bytes of padding: the 8 row addresses of an
// ldmatrix phase then fall on distinct banks, so no swizzle is needed).
// A warp owns 16 consecutive rows of every product it computes (rows m0 .. m0 + 15, m0 = 16 * warp)
// and holds it as mma.sync m16n8k16 accumulator fragments, float acc[NB][4] for 8 * NB columns:
//   acc[nb][e] is element (m0 + lane / 4 + 8 * (e / 2), 8 * nb + 2 * (lane % 4) + e % 2).
// Row statistics therefore reduce over the 4 lanes of a quad (shfl_xor 1 and 2).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include <type_traits>

#include "excitor_attention.h"

namespace ek {

constexpr int kThreads = 128;
constexpr int kTile = EK_TILE;
constexpr float kLog2e = 1.4426950408889634f;

template <int COLS>
__host__ __device__ constexpr int pitch() { return COLS + 8; }

// Bytes of one padded (kTile, D) shared tile.
template <class T, int D>
__host__ __device__ constexpr int tile_bytes() { return kTile * pitch<D>() * int(sizeof(T)); }

struct Frag {  // where this lane's accumulator elements sit inside its warp's 16 x 8 blocks
  int lane, quad_row, quad_col, m0;
  __device__ Frag() : lane(threadIdx.x & 31), quad_row(lane >> 2), quad_col(2 * (lane & 3)), m0(16 * (threadIdx.x >> 5)) {}
  __device__ int row(int e) const { return m0 + quad_row + 8 * (e >> 1); }  // local row of element e
  __device__ int col(int nb, int e) const { return 8 * nb + quad_col + (e & 1); }
};

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

// c += a * b for one m16n8k16 block, float32 accumulation.
template <class T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t *>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t *>(&h);
  }
}

template <class T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

template <int NB>
__device__ __forceinline__ void zero(float (&acc)[NB][4]) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nb][e] = 0.f;
}

// A fragment of the 16 x 16 block (rows m0.., k k0..) of A, where A(m, k) = a[m * lda + k], or
// a[k * lda + m] when A_T (the operand is stored transposed).
template <bool A_T, class T>
__device__ __forceinline__ void load_a(uint32_t (&af)[4], const T *a, int lda, int m0, int k0, int lane) {
  if constexpr (A_T) ldmatrix_x4_trans(af, a + (k0 + (lane & 7) + (lane >> 4) * 8) * lda + m0 + ((lane >> 3) & 1) * 8);
  else ldmatrix_x4(af, a + (m0 + (lane & 15)) * lda + k0 + (lane >> 4) * 8);
}

// B fragments of the 16 x 16 block (k k0.., columns n0..) as two n8 halves {bf[0], bf[1]}, {bf[2], bf[3]},
// where B(k, n) = b[n * ldb + k] (the operand's rows are B's columns: q k^T), or b[k * ldb + n] when B_KN.
template <bool B_KN, class T>
__device__ __forceinline__ void load_b(uint32_t (&bf)[4], const T *b, int ldb, int n0, int k0, int lane) {
  if constexpr (B_KN) ldmatrix_x4_trans(bf, b + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + n0 + (lane >> 4) * 8);
  else ldmatrix_x4(bf, b + (n0 + (lane & 7) + (lane >> 4) * 8) * ldb + k0 + ((lane >> 3) & 1) * 8);
}

template <bool B_KN, int NB, class T>
__device__ __forceinline__ void mma_row(float (&acc)[NB][4], const uint32_t (&af)[4], const T *b, int ldb, int k0,
                                        int lane) {
#pragma unroll
  for (int nb = 0; nb < NB; nb += 2) {
    uint32_t bf[4];
    load_b<B_KN>(bf, b, ldb, 8 * nb, k0, lane);
    mma<T>(acc[nb], af, bf[0], bf[1]);
    mma<T>(acc[nb + 1], af, bf[2], bf[3]);
  }
}

// acc (this warp's 16 rows x 8 NB columns) += A[m0 : m0 + 16, 0 : 16 KS] B[0 : 16 KS, 0 : 8 NB], both in shared memory.
template <bool A_T, bool B_KN, int NB, int KS, class T>
__device__ __forceinline__ void gemm(float (&acc)[NB][4], const T *a, int lda, int m0, const T *b, int ldb) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t af[4];
    load_a<A_T>(af, a, lda, m0, 16 * ks, lane);
    mma_row<B_KN>(acc, af, b, ldb, 16 * ks, lane);
  }
}

// Same with A already in registers as A fragments (a product computed by this warp, see to_a).
template <bool B_KN, int NB, int KS, class T>
__device__ __forceinline__ void gemm_reg(float (&acc)[NB][4], const uint32_t (&af)[KS][4], const T *b, int ldb) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) mma_row<B_KN>(acc, af[ks], b, ldb, 16 * ks, lane);
}

// Accumulator fragments (16 x 8 NB, float) -> A fragments (16 x 16 blocks, T) of the same matrix:
// the m16n8 accumulator layout of two adjacent column blocks is the m16k16 A layout.
template <class T, int NB>
__device__ __forceinline__ void to_a(uint32_t (&af)[NB / 2][4], const float (&c)[NB][4]) {
#pragma unroll
  for (int ks = 0; ks < NB / 2; ++ks) {
    af[ks][0] = pack2<T>(c[2 * ks][0], c[2 * ks][1]);
    af[ks][1] = pack2<T>(c[2 * ks][2], c[2 * ks][3]);
    af[ks][2] = pack2<T>(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    af[ks][3] = pack2<T>(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

// Write this warp's accumulator rows to a shared tile as T (scaled by w).
template <class T, int NB>
__device__ __forceinline__ void store_shared(T *s, int lds, const float (&c)[NB][4], float w, const Frag &f) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<uint32_t *>(s + f.row(2 * h) * lds + f.col(nb, 0)) = pack2<T>(w * c[nb][2 * h], w * c[nb][2 * h + 1]);
}

// Write this warp's accumulator rows r < rows_valid to global memory (row pitch ld, unit column stride).
template <class T, int NB>
__device__ __forceinline__ void store_global(T *g, int64_t ld, int rows_valid, const float (&c)[NB][4], const Frag &f) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = f.row(2 * h);
    if (r >= rows_valid) continue;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
      *reinterpret_cast<uint32_t *>(g + r * ld + f.col(nb, 0)) = pack2<T>(c[nb][2 * h], c[nb][2 * h + 1]);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Sum of x over the CTA, valid in thread 0. red: kThreads / 32 floats of shared memory. Contains barriers.
__device__ __forceinline__ float block_sum(float x, float *red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x == 0)
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w];
  return s;
}

// Shared tile s[r][c] = g[r][c] + w * g2[r][c] (g2 optional) for r < rows_valid, 0 for the other rows of
// the kTile; COLS columns. Global rows have pitch ld (ld2) elements and 16-byte aligned starts.
template <class T, int COLS>
__device__ __forceinline__ void load_tile(T *s, const T *g, int64_t ld, int rows_valid, const T *g2 = nullptr,
                                          int64_t ld2 = 0, float w = 0.f) {
  constexpr int kChunks = COLS / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows_valid) {
      val = __ldg(reinterpret_cast<const uint4 *>(g + r * ld + c));
      if (g2 != nullptr) {
        const uint4 add = __ldg(reinterpret_cast<const uint4 *>(g2 + r * ld2 + c));
        const T *x = reinterpret_cast<const T *>(&val);
        const T *y = reinterpret_cast<const T *>(&add);
        uint32_t out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          out[j] = pack2<T>(to_float(x[2 * j]) + w * to_float(y[2 * j]), to_float(x[2 * j + 1]) + w * to_float(y[2 * j + 1]));
        val = make_uint4(out[0], out[1], out[2], out[3]);
      }
    }
    *reinterpret_cast<uint4 *>(s + r * pitch<COLS>() + c) = val;
  }
}

// In place: z[r, n] <- softmax_n(scale_log2 * z[r, n]) over the prompts n < P (padded columns get 0).
// z holds this warp's 16 rows x kTile prompt columns.
__device__ __forceinline__ void prompt_softmax(float (&z)[kTile / 8][4], int P, float scale_log2, const Frag &f) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -CUDART_INF_F;
#pragma unroll
    for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
      for (int e = 2 * h; e < 2 * h + 2; ++e) {
        z[nb][e] = f.col(nb, e) < P ? z[nb][e] * scale_log2 : -CUDART_INF_F;
        mx = fmaxf(mx, z[nb][e]);
      }
    mx = quad_max(mx);  // finite: P >= 1
    float sum = 0.f;
#pragma unroll
    for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
      for (int e = 2 * h; e < 2 * h + 2; ++e) {
        z[nb][e] = exp2f(z[nb][e] - mx);
        sum += z[nb][e];
      }
    const float inv = 1.f / quad_sum(sum);
#pragma unroll
    for (int nb = 0; nb < kTile / 8; ++nb)
#pragma unroll
      for (int e = 2 * h; e < 2 * h + 2; ++e) z[nb][e] *= inv;
  }
}

// The one prompt mixture both operators use, for this warp's 16 rows of x (shared tiles, pitch D + 8):
//   a[r, n] = softmax_n(scale <x_r, pk_n>),  out_r = sum_n a[r, n] pv_n
// Excitor key reconstruction: x = sim keys (or k), pv = pk, out = ke. Adapter: x = q, out = op.
template <class T, int D>
__device__ __forceinline__ void prompt_mix(float (&out)[D / 8][4], float (&a)[kTile / 8][4], const T *x,
                                           const T *pk, const T *pv, int P, float scale_log2, const Frag &f) {
  zero(a);
  gemm<false, false, kTile / 8, D / 16>(a, x, pitch<D>(), f.m0, pk, pitch<D>());
  prompt_softmax(a, P, scale_log2, f);
  uint32_t af[kTile / 16][4];
  to_a<T>(af, a);
  zero(out);
  gemm_reg<true, D / 8, kTile / 16>(out, af, pv, pitch<D>());
}

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// First key index a causal query tile [start_m, start_m + kTile) cannot see: query i sees keys j <= i + N - M.
__device__ __forceinline__ int key_end(int start_m, int M, int N, bool causal) {
  return causal ? min(N, max(start_m + kTile + N - M, 0)) : N;
}

}  // namespace ek

namespace ek {

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}, integral_constant<D>, integral_constant<BYPASS>) for the runtime dtype, head dim and
// operator; invalid combinations (the Python layer never sends them) give cudaErrorInvalidValue.
template <class F>
cudaError_t dispatch(const EkFwdParams &p, F &&f) {
  auto by_dim = [&](auto tag) -> cudaError_t {
    auto by_op = [&](auto dim) -> cudaError_t {
      if (p.bypass == EK_EXCITOR) return f(tag, dim, std::integral_constant<int, EK_EXCITOR>{});
      if (p.bypass == EK_ADAPTER) return f(tag, dim, std::integral_constant<int, EK_ADAPTER>{});
      return cudaErrorInvalidValue;
    };
    if (p.head_dim == 64) return by_op(std::integral_constant<int, 64>{});
    if (p.head_dim == 128) return by_op(std::integral_constant<int, 128>{});
    return cudaErrorInvalidValue;
  };
  if (p.num_prompts < 1 || p.num_prompts > EK_MAX_PROMPTS) return cudaErrorInvalidValue;
  if (p.dtype == EK_FLOAT16) return by_dim(Tag<__half>{});
  if (p.dtype == EK_BFLOAT16) return by_dim(Tag<__nv_bfloat16>{});
  return cudaErrorInvalidValue;
}

// Opt a kernel in to more than 48 KiB of dynamic shared memory, then launch it.
template <class K, class... Args>
cudaError_t launch(K kernel, dim3 grid, int smem, cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace ek
