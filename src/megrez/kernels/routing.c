/* MoE routing of token rows: the router's float32 product, the scores, the top-k choice and
 * the normalised weights, in one call (models/moe.py's route() is the torch definition):
 *
 *   logits[e] = x . W[e]; scores = sigmoid(logits) or softmax(logits);
 *   choice = scores (+ bias, for noaux_tc); indices = the top_k choices, best first (equal
 *   choices: the lower expert id first); weights = scores[indices], divided by their sum
 *   (+ 1e-20) when normalising and top_k > 1, times scale.
 *
 * Why in C: at one token, torch's version is about a dozen operator calls (and, for the
 * product, a BLAS call that wakes its thread pool), each costing more than the arithmetic.
 * Each row is routed by one thread in one order (dot products in 16 independent lanes that the
 * compiler vectorises, -ffp-contract=off), so a row's experts and weights do not depend on the
 * rows beside it, the thread count or the instruction set. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "lanes.h"
#include "pool.h"
#include "routing.h"

#define MAX_EXPERTS 1024

static void route_row(void *ctx, int phase, int64_t r) {
    (void)phase;
    const mz_route *a = (const mz_route *)ctx;
    int64_t E = a->experts, k = a->top_k;
    float scores[MAX_EXPERTS], choice[MAX_EXPERTS];
    const float *x = a->x + r * a->hidden;
    for (int64_t e = 0; e < E; ++e) scores[e] = dot(x, a->w + e * a->hidden, a->hidden);
    if (a->softmax) {
        float m = scores[0], sum = 0.0f;
        for (int64_t e = 1; e < E; ++e) m = scores[e] > m ? scores[e] : m;
        for (int64_t e = 0; e < E; ++e) sum += (scores[e] = expf(scores[e] - m));
        for (int64_t e = 0; e < E; ++e) scores[e] = scores[e] / sum;
    } else {
        for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = a->bias ? scores[e] + a->bias[e] : scores[e];
    float *wr = a->weights + r * k, total = 0.0f;
    int64_t *ir = a->indices + r * k;
    /* Selection by repeated scans: k and E are small (6 of 64). A strict '>' keeps the lower
     * id on equal choices; a NaN choice is never taken over a number. */
    unsigned char taken[MAX_EXPERTS] = {0};
    for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
            if (taken[e]) continue;
            float c = choice[e];
            if (best < 0 || c > choice[best] || (choice[best] != choice[best] && c == c)) best = e;
        }
        taken[best] = 1;
        ir[j] = best;
        wr[j] = scores[best];
    }
    if (a->normalize && k > 1) {
        for (int64_t j = 0; j < k; ++j) total += wr[j];
        for (int64_t j = 0; j < k; ++j) wr[j] = wr[j] / (total + 1e-20f);
    }
    for (int64_t j = 0; j < k; ++j) wr[j] = wr[j] * a->scale;
}

int megrez_route(const mz_route *a) {
    if (a->x == NULL || a->w == NULL || a->weights == NULL || a->indices == NULL || a->rows < 0 || a->hidden < 1 ||
        a->experts < 1 || a->experts > MAX_EXPERTS || a->top_k < 1 ||
        a->top_k > a->experts)
        return -1;
    mz_job job = {1, {a->rows}, {1}, route_row, (void *)a};
    /* One thread for a decoding step's few rows: waking workers costs more than the product. */
    mz_run(&job, a->rows >= 8 ? mz_threads(a->rows * a->experts * a->hidden * 4) : 1);
    return 0;
}
