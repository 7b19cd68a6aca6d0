/* The quantized products of quantized.c, for the kernel files that chain them (decode_ops.c). */
#ifndef MEGREZ_PRODUCTS_H
#define MEGREZ_PRODUCTS_H
#include <stdint.h>

/* y [m, n] = x [m, k] @ W^T, W [n, k] in ggml block format qtype; with swiglu,
 * y = silu(x @ W1^T) * (x @ W2^T). */
typedef struct {
    const float *x;
    int64_t m;
    const uint8_t *w1, *w2; /* [n, row bytes]; w2: the up projection when swiglu, else unused */
    int32_t qtype, swiglu;
    int64_t n, k;
    float *y;
} mz_product;

/* Runs count1 products, then count2 products (which may read the first stage's outputs), in
 * one parallel call. 0 on success. */
int megrez_q_products(int64_t count1, const mz_product *p1, int64_t count2, const mz_product *p2);
/* One token's MoE layer (quantized.c): stage-1 products p1 (SwiGLU), stage-2 p2 (down, each
 * [1, hidden]), out = the first n_weighted outputs weighted, in order, plus the rest. */
int megrez_q_moe_token(int64_t count, const mz_product *p1, const mz_product *p2, int64_t n_weighted,
                       const float *weights, int64_t hidden, float *out);
#endif
