/* routing.c's routing of token rows, for the kernel files that chain it (moe_step.c). */
#ifndef MEGREZ_ROUTING_H
#define MEGREZ_ROUTING_H
#include <stdint.h>

typedef struct {
    int64_t rows, hidden, experts, top_k;
    const float *x;      /* [rows, hidden] */
    const float *w;      /* [experts, hidden] */
    const float *bias;   /* [experts], added to the scores for the choice only; NULL: none */
    int32_t softmax;     /* 0: sigmoid scores, 1: softmax */
    int32_t normalize;
    float scale;
    float *weights;      /* [rows, top_k] */
    int64_t *indices;    /* [rows, top_k] */
} mz_route;

int megrez_route(const mz_route *a);
#endif
