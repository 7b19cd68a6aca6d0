/* The kernels' own worker threads (pool.c).
 *
 * A job is a sequence of phases, each a number of items; an item of phase p runs only after
 * every item of phase p-1 finished (e.g. quantize the activations, then the products that read
 * them). Items are claimed from shared counters, so a thread that the OS has descheduled on a
 * busy machine is never waited for: the others take its share, and nothing waits for a thread
 * to arrive. The caller works too and returns when every item has run. */
#ifndef MEGREZ_POOL_H
#define MEGREZ_POOL_H
#include <stdint.h>

#define MZ_MAX_PHASES 4

typedef struct {
    int nphases;
    int64_t items[MZ_MAX_PHASES]; /* items of each phase (0 allowed) */
    int64_t chunk[MZ_MAX_PHASES]; /* items claimed at a time */
    void (*run)(void *ctx, int phase, int64_t item);
    void *ctx;
} mz_job;

/* Threads for a call that reads this many weight bytes: the caller's OpenMP thread count (what
 * torch.set_num_threads / --threads set), or 1 below 128 KiB, where waking the others costs
 * more than they save. */
int mz_threads(int64_t weight_bytes);

/* Runs the job on up to nthreads threads (the caller and nthreads - 1 workers). */
void mz_run(const mz_job *job, int nthreads);
#endif
