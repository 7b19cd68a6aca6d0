/* The operations of a decoding step other than the weight products: attention against the
 * paged KV cache (one new token per row), RMSNorm, and a whole decoder layer with quantized
 * weights chaining them with the products of quantized.c.
 *
 * megrez_decode_attention rotates each row's new query and key (rotate-half RoPE from the
 * row's cos/sin, the same three IEEE operations per element as torch's x*cos + rot(x)*sin),
 * writes the key and value into the row's cache slot, then attends over the row's keys
 * 0..len-1: out = softmax(scale * q.k_s) . v_s. Every row is written before any is read (rows of
 * one step may share blocks). Each (row, KV head) is computed by one thread in one order, so a
 * row's result depends neither on the rows beside it nor on the thread count.
 *
 * Why in C: at one token per row, the torch version of these steps is about thirty operator
 * calls per layer, each costing more than the arithmetic. float32 throughout; portable C
 * (16 independent lanes that the compiler vectorises, -ffp-contract=off).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "decode_ops.h"
#include "lanes.h"
#include "products.h"

typedef struct {
    int64_t rows, n_heads, n_kv, head_dim;
    int64_t num_blocks, block_size, max_blocks;
    const float *q, *k, *v; /* [rows, n_heads | n_kv, head_dim], q and k before rotation */
    const float *cos, *sin; /* [rows, head_dim] */
    float *k_cache, *v_cache; /* [n_kv, num_blocks, block_size, head_dim] */
    const int64_t *tables;  /* [rows, max_blocks] */
    const int64_t *lengths; /* keys of each row after this step; the new token is the last */
    float scale;
    float *out;             /* [rows, n_heads, head_dim] */
} mz_decode_attention;

static void rotate(const float *x, const float *c, const float *s, int64_t hd, float *out) {
    int64_t h = hd / 2;
    for (int64_t d = 0; d < hd; ++d) {
        float r = d < h ? -x[d + h] : x[d - h];
        out[d] = x[d] * c[d] + r * s[d];
    }
}

typedef struct {
    const mz_decode_attention *a;
    float *qrot;   /* [rows, n_heads, head_dim] */
    float *scores; /* [rows, n_heads, max length] */
    int64_t max_len;
} call;

static inline float *slot(const mz_decode_attention *a, float *cache, int64_t row, int64_t kv, int64_t pos) {
    int64_t block = a->tables[row * a->max_blocks + pos / a->block_size];
    return cache + ((kv * a->num_blocks + block) * a->block_size + pos % a->block_size) * a->head_dim;
}

static void write_row(const call *c, int64_t r) {
    const mz_decode_attention *a = c->a;
    int64_t hd = a->head_dim, pos = a->lengths[r] - 1;
    const float *cs = a->cos + r * hd, *sn = a->sin + r * hd;
    for (int64_t h = 0; h < a->n_heads; ++h)
        rotate(a->q + (r * a->n_heads + h) * hd, cs, sn, hd, c->qrot + (r * a->n_heads + h) * hd);
    for (int64_t g = 0; g < a->n_kv; ++g) {
        rotate(a->k + (r * a->n_kv + g) * hd, cs, sn, hd, slot(a, a->k_cache, r, g, pos));
        memcpy(slot(a, a->v_cache, r, g, pos), a->v + (r * a->n_kv + g) * hd, (size_t)hd * sizeof(float));
    }
}

/* exp(x) in place for x <= 0 (scores after subtracting their maximum): x = n ln2 + r with
 * |r| <= ln2 / 2, exp(r) by its Taylor polynomial to r^6 (truncation < 1.3e-7 relative), times
 * 2^n through the exponent bits. A loop the compiler vectorises, where libm's expf is one call
 * per score; below -87 (where float32 is about to underflow) the result is exp(-87). */
static void exp_row(float *p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        float x = p[i] < -87.0f ? -87.0f : p[i];
        float k = nearbyintf(x * 1.44269504f);
        float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
        float e = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
        union { int32_t i; float f; } two = {((int32_t)k + 127) << 23};
        p[i] = e * two.f;
    }
}

/* Heads per pass over a group's values, and vectors of 16 of each head's outputs held at once:
 * 4 x 4 accumulators fit AVX-512's 32 registers; AVX2's 16 hold 4 x 1 (two registers each). */
#define VHEADS 4
#if defined(__AVX512F__)
#define VCHUNK 4
#else
#define VCHUNK 1
#endif

/* o[j][d] = sum over keys s of p[j][s] * v_s[d] for heads j0..j0+nj-1 (nj <= VHEADS) and d in
 * [d0, d0 + 16 * nv): per element from 0, keys in order, a multiply then an add. */
static inline __attribute__((always_inline)) void weighted_values(const mz_decode_attention *a, int64_t r, int64_t g, const float *sc, int64_t ms,
                            int64_t len, int nj, int64_t d0, int nv, float *o) {
    int64_t hd = a->head_dim, bs = a->block_size;
    v16 acc[VHEADS][VCHUNK];
    for (int j = 0; j < nj; ++j)
        for (int c = 0; c < nv; ++c) acc[j][c] = v16_zero();
    for (int64_t s0 = 0; s0 < len; s0 += bs) {
        const float *vb = slot(a, a->v_cache, r, g, s0) + d0;
        int64_t n = len - s0 < bs ? len - s0 : bs;
        for (int64_t i = 0; i < n; ++i) {
            const float *v = vb + i * hd;
            for (int j = 0; j < nj; ++j) {
                v16 w = v16_set1(sc[j * ms + s0 + i]);
                for (int c = 0; c < nv; ++c) acc[j][c] = v16_add(acc[j][c], v16_mul(w, v16_load(v + LANES * c)));
            }
        }
    }
    for (int j = 0; j < nj; ++j)
        for (int c = 0; c < nv; ++c) v16_store(o + j * hd + d0 + LANES * c, acc[j][c]);
}

/* One (row, KV head): its rep query heads against the row's keys, in one fixed order. */
static void attend(const call *c, int64_t r, int64_t g) {
    const mz_decode_attention *a = c->a;
    int64_t hd = a->head_dim, len = a->lengths[r], rep = a->n_heads / a->n_kv, ms = c->max_len;
    const float *q = c->qrot + (r * a->n_heads + g * rep) * hd;
    float *sc = c->scores + (r * a->n_heads + g * rep) * ms;
    float *o = a->out + (r * a->n_heads + g * rep) * hd; /* the group's heads are consecutive */
    int64_t bs = a->block_size;
    /* scores: keys block by block (no division per key), each key read once for the group */
    for (int64_t s0 = 0; s0 < len; s0 += bs) {
        const float *kb = slot(a, a->k_cache, r, g, s0);
        int64_t n = len - s0 < bs ? len - s0 : bs;
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < rep; ++j) sc[j * ms + s0 + i] = dot(q + j * hd, kb + i * hd, hd) * a->scale;
    }
    for (int64_t j = 0; j < rep; ++j) {
        float *p = sc + j * ms, m = -INFINITY;
        for (int64_t s = 0; s < len; ++s) m = p[s] > m ? p[s] : m;
        for (int64_t s = 0; s < len; ++s) p[s] -= m;
        exp_row(p, len);
    }
    for (int64_t j0 = 0; j0 < rep; j0 += VHEADS) {
        int nj = (int)(rep - j0 < VHEADS ? rep - j0 : VHEADS);
        const float *p = sc + j0 * ms;
        float *oj = o + j0 * hd;
        int64_t hd16 = hd / LANES * LANES;
        for (int64_t d0 = 0; d0 < hd16; d0 += LANES * VCHUNK) {
            int nv = (int)((hd16 - d0) / LANES < VCHUNK ? (hd16 - d0) / LANES : VCHUNK);
            if (nj == VHEADS && nv == VCHUNK) /* constants: the accumulators stay in registers */
                weighted_values(a, r, g, p, ms, len, VHEADS, d0, VCHUNK, oj);
            else
                weighted_values(a, r, g, p, ms, len, nj, d0, nv, oj);
        }
        for (int64_t d = hd16; d < hd; ++d) /* the last hd % 16 */
            for (int j = 0; j < nj; ++j) {
                float acc = 0.0f;
                for (int64_t s0 = 0; s0 < len; s0 += bs) {
                    const float *vb = slot(a, a->v_cache, r, g, s0);
                    int64_t n = len - s0 < bs ? len - s0 : bs;
                    for (int64_t i = 0; i < n; ++i) acc += p[j * ms + s0 + i] * vb[i * hd + d];
                }
                oj[j * hd + d] = acc;
            }
    }
    /* the heads' sums side by side (one chain each, in key order) */
    float sum[VHEADS];
    for (int64_t j0 = 0; j0 < rep; j0 += VHEADS) {
        int nj = (int)(rep - j0 < VHEADS ? rep - j0 : VHEADS);
        for (int j = 0; j < nj; ++j) sum[j] = 0.0f;
        for (int64_t s = 0; s < len; ++s)
            for (int j = 0; j < nj; ++j) sum[j] += sc[(j0 + j) * ms + s];
        for (int j = 0; j < nj; ++j) {
            float inv = 1.0f / sum[j], *oj = o + (j0 + j) * hd;
            for (int64_t d = 0; d < hd; ++d) oj[d] *= inv;
        }
    }
}

static void run_item(void *ctx, int phase, int64_t item) {
    const call *c = (const call *)ctx;
    if (phase == 0)
        write_row(c, item);
    else
        attend(c, item / c->a->n_kv, item % c->a->n_kv);
}

/* 0 on success, -1 for invalid arguments, -2 out of memory. */
int megrez_decode_attention(const mz_decode_attention *a) {
    if (a->rows < 1 || a->n_kv < 1 || a->n_heads % a->n_kv || a->head_dim < 2 || a->head_dim % 2 ||
        a->block_size < 1 || a->max_blocks < 1)
        return -1;
    int64_t max_len = 0;
    for (int64_t r = 0; r < a->rows; ++r) {
        int64_t len = a->lengths[r];
        if (len < 1 || len > a->max_blocks * a->block_size) return -1;
        for (int64_t b = 0; b < (len + a->block_size - 1) / a->block_size; ++b) {
            int64_t block = a->tables[r * a->max_blocks + b];
            if (block < 0 || block >= a->num_blocks) return -1;
        }
        max_len = len > max_len ? len : max_len;
    }
    float *qrot = (float *)malloc((size_t)(a->rows * a->n_heads * (a->head_dim + max_len)) * sizeof(float));
    if (qrot == NULL) return -2;
    call c = {a, qrot, qrot + a->rows * a->n_heads * a->head_dim, max_len};
    int64_t kv_bytes = 0;
    for (int64_t r = 0; r < a->rows; ++r) kv_bytes += 2 * a->lengths[r] * a->n_kv * a->head_dim * 4;
    mz_job job = {2, {a->rows, a->rows * a->n_kv}, {1, 1}, run_item, &c};
    mz_run(&job, mz_threads(kv_bytes));
    free(qrot);
    return 0;
}

/* y[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), rows of n floats: torch's float32 RMSNorm
 * with the weight multiplied last, the sum of squares in a fixed order per row (a row's
 * result does not depend on how many rows there are). */
int megrez_rms_norm(const float *x, const float *w, int64_t rows, int64_t n, float eps, float *y) {
    if (rows < 0 || n < 1) return -1;
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float inv = 1.0f / sqrtf(dot(xr, xr, n) / (float)n + eps);
        for (int64_t d = 0; d < n; ++d) yr[d] = w[d] * (xr[d] * inv);
    }
    return 0;
}

/* One decoder layer at one new token per row, quantized weights (no biases):
 *   x = rms_norm(h_in, norm1); q, k, v = x Wq^T, x Wk^T, x Wv^T; a = attention (as above);
 *   h_out = h_in + a Wo^T; y = rms_norm(h_out, norm2);
 *   with an MLP (wg != NULL): h_out = h_out + (silu(y Wg^T) * (y Wu^T)) Wd^T.
 * The same operations in the same order as the model's modules run them one by one, so the same
 * bits, in one call instead of about ten. */

int megrez_decode_layer(const mz_decode_layer *L) {
    int64_t rows = L->rows, H = L->hidden, nq = L->n_heads * L->head_dim, nkv = L->n_kv * L->head_dim;
    if (rows < 1 || H < 1 || nq < 1 || nkv < 1 || (L->wg != NULL && L->inter < 1)) return -1;
    int64_t floats = rows * (H + nq + 2 * nkv + nq + H + (L->wg ? L->inter + H : 0));
    float *buf = (float *)malloc((size_t)floats * sizeof(float));
    if (buf == NULL) return -2;
    float *xn = buf, *q = xn + rows * H, *k = q + rows * nq, *v = k + rows * nkv, *att = v + rows * nkv,
          *o = att + rows * nq, *g = o + rows * H, *d = g + rows * (L->wg ? L->inter : 0);
    int rc = megrez_rms_norm(L->h_in, L->norm1, rows, H, L->eps, xn);
    mz_product qkv[3] = {{xn, rows, L->wq, NULL, L->tq, 0, nq, H, q},
                         {xn, rows, L->wk, NULL, L->tk, 0, nkv, H, k},
                         {xn, rows, L->wv, NULL, L->tv, 0, nkv, H, v}};
    if (rc == 0) rc = megrez_q_products(3, qkv, 0, NULL);
    mz_decode_attention a = {rows, L->n_heads, L->n_kv, L->head_dim, L->num_blocks, L->block_size, L->max_blocks,
                             q, k, v, L->cos, L->sin, L->k_cache, L->v_cache, L->tables, L->lengths, L->scale, att};
    if (rc == 0) rc = megrez_decode_attention(&a);
    mz_product out = {att, rows, L->wo, NULL, L->to, 0, H, nq, o};
    if (rc == 0) rc = megrez_q_products(1, &out, 0, NULL);
    if (rc == 0) {
        for (int64_t i = 0; i < rows * H; ++i) L->h_out[i] = L->h_in[i] + o[i];
        rc = megrez_rms_norm(L->h_out, L->norm2, rows, H, L->eps, L->y);
    }
    if (rc == 0 && L->wg != NULL) {
        mz_product up = {L->y, rows, L->wg, L->wu, L->tgu, 1, L->inter, H, g};
        mz_product down = {g, rows, L->wd, NULL, L->td, 0, H, L->inter, d};
        rc = megrez_q_products(1, &up, 1, &down);
        if (rc == 0)
            for (int64_t i = 0; i < rows * H; ++i) L->h_out[i] = L->h_out[i] + d[i];
    }
    free(buf);
    return rc;
}
