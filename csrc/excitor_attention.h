// Torch-free interface of the CUDA kernels (docs/contract.md): plain C structs of pointers, element strides,
// sizes and scalars, and two launch functions that return a cudaError_t value (0 on success).
// The binding (binding.cpp) is the only translation unit that sees both this header and torch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Rows of every tile the kernels use: query tiles, key tiles and the padded prompt block.
// The binding sizes the per-tile gradient slices with it.
#define EK_TILE 64
#define EK_MAX_PROMPTS 64

enum { EK_EXCITOR = 1, EK_ADAPTER = 2 };
enum { EK_FLOAT16 = 0, EK_BFLOAT16 = 1 };

// Element strides of a (B, H, rows, d) operand with a unit stride on d. Batch-shared prompts
// (H, P, d) use b = 0.
typedef struct {
  int64_t b, h, row;
} EkStrides;

typedef struct {
  const void *q, *k, *v;
  const void *s;   // what keys compare with the prompts: sim_keys, or k itself (then sim_is_k = 1)
  const void *pk;  // prompt keys
  const void *pv;  // prompt values (adapter), unused by the excitor
  const float *gate;  // (Hq,) float32
  void *o;            // (B, Hq, M, d), strides o_st
  float *lse;         // (B, Hq, M) contiguous, base-2 log-sum-exp of the token scores, +inf for empty rows
  void *ke;           // excitor: reconstructed keys (B, Hkv, N, d) in the input dtype, strides ke_st
  EkStrides q_st, k_st, v_st, s_st, pk_st, pv_st, o_st, ke_st;
  int batch, q_heads, kv_heads, q_len, kv_len, head_dim, num_prompts;
  float softmax_scale, prompt_scale;
  int causal, bypass, sim_is_k, dtype;
} EkFwdParams;

typedef struct {
  EkFwdParams f;      // the forward's operands; o, lse and ke are read
  const void *dout;
  float *delta;       // (B, Hq, M) contiguous workspace
  void *dq, *dk, *dv;
  void *dsim;         // sim_keys' gradient (unused when sim_is_k: it is added to dk)
  EkStrides do_st, dq_st, dk_st, dv_st, ds_st;
  // float32 accumulation buffers for the prompt and gate gradients. Element offset of a slice:
  //   dpk/dpv: tile * dp_tile + b * dp_b + kv_head * dp_h + group_member * dp_member + p * dp_p + col
  //   dgate:   tile * dg_tile + b * dg_b + q_head
  // Zero strides make programs add into one slice (atomics); the deterministic layout gives every
  // program its own slice so each address receives exactly one add.
  float *dpk, *dpv, *dgate;
  int64_t dp_tile, dp_b, dp_h, dp_member, dp_p;
  int64_t dg_tile, dg_b;
} EkBwdParams;

// Forward: (excitor) the reconstructed keys into ke, then o and lse. One launch each.
int ek_forward(const EkFwdParams *p, cudaStream_t stream);
// Backward: delta, then one launch for dk/dv/prompt chain rule (key tiles) and dq (query tiles).
// dpk, dpv and dgate must be zeroed by the caller.
int ek_backward(const EkBwdParams *p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
