/* A whole decoding step at one token, quantized weights: every decoder layer in one call (Megrez2's
 * dense and MoE layers; a Llama model's layers are all dense).
 *
 * Per layer i, the calls the model makes one by one (models/megrez_moe.py, run_layers), in
 * its order, so the same bits:
 *   h, y = megrez_decode_layer(h)          attention half; a dense layer's MLP included
 *   routing of i from y (route_self)       an MoE layer with no pre-gating source
 *   routing of i + 1 from y (route_next)   pre-gating: the next layer's router reads y_i
 *   h = h + megrez_q_moe_token(y, ...)     an MoE layer: its routed experts (ascending ids,
 *                                          from its group's bank) and shared experts
 * Each MoE layer's routing is returned (best choice first, as megrez_route gives it) for the
 * routing hooks. Why in C: at one token, the Python between these calls cost about as much as
 * the calls (a 350M-parameter step: ~5 of ~19 ms). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode_ops.h"
#include "products.h"
#include "routing.h"

typedef struct {
    mz_decode_layer att;       /* weights, norms and shapes; the step fills rows, h, y, cos/sin, caches */
    int32_t moe, route_self, route_next;
    const float *router, *router_bias; /* this layer's router [experts, hidden]; bias or NULL */
    const uint8_t *eg, *eu, *ed;        /* the group's bank: gate/up [E, inter, H], down [E, H, inter] */
    int64_t gu_stride, d_stride, inter; /* bytes per expert */
    int32_t tgu, td;
    const uint8_t *sg, *su, *sd;        /* shared experts as one MLP (NULL: none) */
    int64_t s_inter;
    int32_t stgu, std;
} mz_step_layer;

typedef struct {
    int64_t layers, hidden, experts, top_k;
    int32_t softmax, normalize;
    float scale;
    const mz_step_layer *L;
    float *h;                          /* [hidden]: the embedding in, the last layer's output out */
    const float *cos, *sin;            /* [head_dim] */
    float *const *k_caches, *const *v_caches;
    int64_t num_blocks, block_size, max_blocks;
    const int64_t *tables, *lengths;
    int64_t *indices;                  /* [layers, top_k]: each MoE layer's experts */
    float *weights;                    /* [layers, top_k] */
} mz_moe_step;

#define MAX_STEP_EXPERTS 64

static int route(const mz_moe_step *s, const mz_step_layer *l, const float *y, int64_t i) {
    mz_route r = {1, s->hidden, s->experts, s->top_k, y, l->router, l->router_bias, s->softmax, s->normalize,
                  s->scale, s->weights + i * s->top_k, s->indices + i * s->top_k};
    return megrez_route(&r);
}

static int moe(const mz_moe_step *s, const mz_step_layer *l, const float *y, int64_t i, float *hbuf, float *ys,
               float *out) {
    int64_t k = s->top_k, H = s->hidden, n = 0, at = 0;
    int64_t ids[MAX_STEP_EXPERTS];
    float w[MAX_STEP_EXPERTS];
    /* ascending expert ids with their weights (the order the model's one-token path sums in) */
    for (int64_t j = 0; j < k; ++j) {
        int64_t e = s->indices[i * k + j], t = j;
        float v = s->weights[i * k + j];
        if (e < 0 || e >= s->experts) return -1;
        while (t > 0 && ids[t - 1] > e) ids[t] = ids[t - 1], w[t] = w[t - 1], --t;
        ids[t] = e, w[t] = v;
    }
    mz_product p1[MAX_STEP_EXPERTS + 1], p2[MAX_STEP_EXPERTS + 1];
    for (int64_t j = 0; j < k; ++j, ++n) {
        int64_t e = ids[j];
        p1[n] = (mz_product){y, 1, l->eg + e * l->gu_stride, l->eu + e * l->gu_stride, l->tgu, 1, l->inter, H, hbuf + at};
        p2[n] = (mz_product){hbuf + at, 1, l->ed + e * l->d_stride, NULL, l->td, 0, H, l->inter, ys + n * H};
        at += l->inter;
    }
    if (l->sg != NULL) {
        p1[n] = (mz_product){y, 1, l->sg, l->su, l->stgu, 1, l->s_inter, H, hbuf + at};
        p2[n] = (mz_product){hbuf + at, 1, l->sd, NULL, l->std, 0, H, l->s_inter, ys + n * H};
        ++n;
    }
    return megrez_q_moe_token(n, p1, p2, k, w, H, out);
}

int megrez_moe_decode_step(const mz_moe_step *s) {
    int64_t H = s->hidden, k = s->top_k;
    if (s->layers < 1 || H < 1 || k < 1 || k > MAX_STEP_EXPERTS || s->experts < k) return -1;
    int64_t inter = 0;
    for (int64_t i = 0; i < s->layers; ++i) {
        const mz_step_layer *l = &s->L[i];
        int64_t need = l->moe ? k * l->inter + (l->sg ? l->s_inter : 0) : 0;
        inter = need > inter ? need : inter;
        if (l->route_next && (i + 1 >= s->layers || !s->L[i + 1].moe)) return -1;
        if (l->moe && !l->route_self && (i == 0 || !s->L[i - 1].route_next)) return -1;
        if (l->moe && (l->router == NULL || l->eg == NULL || l->eu == NULL || l->ed == NULL)) return -1;
    }
    float *buf = (float *)malloc((size_t)(4 * H + inter + (k + 1) * H) * sizeof(float));
    if (buf == NULL) return -2;
    float *cur = buf, *nxt = cur + H, *y = nxt + H, *out = y + H, *hbuf = out + H, *ys = hbuf + inter;
    memcpy(cur, s->h, (size_t)H * sizeof(float));
    int rc = 0;
    for (int64_t i = 0; i < s->layers && rc == 0; ++i) {
        const mz_step_layer *l = &s->L[i];
        mz_decode_layer a = l->att;
        a.rows = 1, a.h_in = cur, a.h_out = nxt, a.y = y, a.cos = s->cos, a.sin = s->sin;
        a.k_cache = s->k_caches[i], a.v_cache = s->v_caches[i];
        a.num_blocks = s->num_blocks, a.block_size = s->block_size, a.max_blocks = s->max_blocks;
        a.tables = s->tables, a.lengths = s->lengths;
        rc = megrez_decode_layer(&a);
        if (rc == 0 && l->moe && l->route_self) rc = route(s, l, y, i);
        if (rc == 0 && l->route_next) rc = route(s, &s->L[i + 1], y, i + 1);
        if (rc == 0 && l->moe) {
            rc = moe(s, l, y, i, hbuf, ys, out);
            for (int64_t d = 0; d < H && rc == 0; ++d) nxt[d] = nxt[d] + out[d];
        }
        float *t = cur;
        cur = nxt, nxt = t;
    }
    if (rc == 0) memcpy(s->h, cur, (size_t)H * sizeof(float));
    free(buf);
    return rc;
}
