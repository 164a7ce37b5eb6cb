// Calls the csrc launch functions once per (dtype, head dim, operator) with a small problem; linked with
// runtime_stubs.c, every launch prints the dynamic shared memory it asks for (bench/static.py). A launch
// function the linked object does not define is skipped (weak reference).
#include "excitor_attention.h"

#pragma weak ek_forward
#pragma weak ek_backward

int main() {
  for (int dtype : {EK_FLOAT16, EK_BFLOAT16})
    for (int d : {64, 128})
      for (int bypass : {EK_EXCITOR, EK_ADAPTER}) {
        EkBwdParams bp = {};
        EkFwdParams &p = bp.f;
        p.batch = p.q_heads = p.kv_heads = 1;
        p.q_len = p.kv_len = EK_TILE;
        p.head_dim = d;
        p.num_prompts = 30;
        p.causal = 1;
        p.bypass = bypass;
        p.sim_is_k = 1;
        p.dtype = dtype;
        if ((ek_forward && ek_forward(&p, 0)) || (ek_backward && ek_backward(&bp, 0))) return 1;
      }
  return 0;
}
