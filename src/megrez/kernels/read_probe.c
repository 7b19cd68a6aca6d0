/* The memory read bandwidth probe of the benchmarks (megrez.bench.measure_read_bandwidth): a
 * pure read of a float32 buffer, summed. Each thread takes its contiguous share and walks
 * `streams` equal parts of it side by side. Why more than one stream: on a 2-vCPU AMD EPYC, two
 * streams per thread read 8-20% faster than one (more reads in flight at once), and a probe
 * slower than the memory would flatter every kernel's fraction of it. */
#include <stdint.h>

#include "lanes.h"
#include "pool.h"

#define MAX_STREAMS 8

typedef struct {
    const float *x;
    int64_t n, items;
    int streams;
    float *partial; /* [items] */
} probe;

static void read_share(void *ctx, int phase, int64_t item) {
    (void)phase;
    const probe *p = (const probe *)ctx;
    int64_t lo = p->n * item / p->items, hi = p->n * (item + 1) / p->items;
    int64_t part = (hi - lo) / p->streams / LANES * LANES;
    v16 acc[MAX_STREAMS];
    for (int s = 0; s < p->streams; ++s) acc[s] = v16_zero();
    for (int64_t i = 0; i < part; i += LANES)
        for (int s = 0; s < p->streams; ++s) acc[s] = v16_add(acc[s], v16_load(p->x + lo + s * part + i));
    float total = 0.0f;
    for (int s = 0; s < p->streams; ++s) total += v16_tree(acc[s]);
    for (int64_t i = lo + p->streams * part; i < hi; ++i) total += p->x[i]; /* the remainder */
    p->partial[item] = total;
}

/* The sum of x[0..n) read by `threads` threads (one share each), `streams` (1-8) per thread. */
float megrez_read_probe(const float *x, int64_t n, int streams, int threads) {
    if (streams < 1 || streams > MAX_STREAMS || threads < 1 || threads > 256 || n < 0) return -1.0f;
    float partial[256];
    probe p = {x, n, threads, streams, partial};
    mz_job job = {1, {threads}, {1}, read_share, &p};
    mz_run(&job, threads);
    float total = 0.0f;
    for (int t = 0; t < threads; ++t) total += partial[t];
    return total;
}
