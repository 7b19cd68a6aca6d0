/* A float32 dot product in one fixed order, for the kernel files that need one (decode_ops.c,
 * routing.c): 16 independent lanes that the compiler vectorises (-ffp-contract=off), then a
 * pairwise tree over the lanes, so the result is the same in every build variant. */
#ifndef MEGREZ_LANES_H
#define MEGREZ_LANES_H
#include <stdint.h>

#define LANES 16

static inline float dot(const float *a, const float *b, int64_t n) {
    float l[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int t = 0; t < LANES; ++t) l[t] += a[d + t] * b[d + t];
    for (; d < n; ++d) l[0] += a[d] * b[d];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int t = 0; t < w; ++t) l[t] += l[t + w];
    return l[0];
}
#endif
