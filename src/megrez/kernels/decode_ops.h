/* decode_ops.c's decoder layer at one new token per row, for the kernel files that chain it
 * (moe_step.c). */
#ifndef MEGREZ_DECODE_OPS_H
#define MEGREZ_DECODE_OPS_H
#include <stdint.h>

typedef struct {
    int64_t rows, hidden, n_heads, n_kv, head_dim, inter;
    const float *h_in;
    float *h_out, *y;        /* [rows, hidden] each */
    const float *norm1, *norm2;
    float eps, scale;
    const uint8_t *wq, *wk, *wv, *wo, *wg, *wu, *wd;
    int32_t tq, tk, tv, to, tgu, td;
    const float *cos, *sin;  /* [rows, head_dim] */
    float *k_cache, *v_cache;
    int64_t num_blocks, block_size, max_blocks;
    const int64_t *tables, *lengths;
} mz_decode_layer;

int megrez_decode_layer(const mz_decode_layer *L);
#endif
