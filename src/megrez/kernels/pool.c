/* The kernels' worker threads (see pool.h).
 *
 * Why not OpenMP's: a decode step makes ~40 kernel calls with ~0.1 ms of other work between
 * them. libgomp's idle threads spin ~3 ms by default, which on a machine whose cores are taken
 * by other processes steals the core the working thread needs (2 tokens/s instead of 25); with
 * the short spin megrez sets for that reason, every call instead pays a sleeping thread's
 * wake-up (measured 70-80 us a call on a 2-vCPU VM: half the time of a 3 MB product). These
 * workers wait in three steps: a few microseconds of pause, then sched_yield() in a loop, which
 * costs nothing when the machine is quiet and hands the core to whoever needs it when it is
 * not, and only after MEGREZ_WAIT_US (default 500; 0 when OMP_WAIT_POLICY=passive) without
 * work do they sleep on a condition variable.
 *
 * Where a thread takes its items: each phase's items are cut into one contiguous range per
 * thread, and a thread claims chunks from its own range first, in ascending order, then from
 * the others' (so a descheduled thread's range is still done by the rest). One contiguous
 * stream of weight rows per thread is what the hardware prefetchers follow: with every
 * thread claiming from one shared counter, the two threads of a 2-core machine took
 * alternating chunks of each matrix, and a 590 KB Q4_K product read from memory (the size of
 * a decoding layer's products) ran no faster on two threads than on one (26-28 against 28-29
 * us; 18 us with contiguous ranges).
 *
 * Publishing a job (a seqlock): the caller makes seq odd, waits until no worker is inside the
 * previous job, writes the job, makes seq even. A worker enters a job by incrementing active and
 * re-reading seq; if seq moved it leaves without reading the job. The caller does not wait for
 * the workers at the end, only for every item to be done: items are the only thing that touch
 * the caller's data. */
#define _GNU_SOURCE
#include "pool.h"

#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_WORKERS 255
#define SPIN_PAUSES 256 /* ~10 us of pause before yielding */
#define MAX_RANGES 16   /* more threads than this share ranges */

/* Items [next, end) of one thread's share of a phase, on a cache line of its own. */
typedef struct {
    _Alignas(64) _Atomic int64_t next;
    int64_t end;
} range;

static struct {
    pthread_mutex_t run_lock; /* one job at a time (callers on several threads take turns) */
    pthread_mutex_t lock;     /* sleepers' */
    pthread_cond_t wake;
    _Atomic uint64_t seq;
    _Atomic int active, sleepers;
    range ranges[MZ_MAX_PHASES][MAX_RANGES];
    _Atomic int64_t done[MZ_MAX_PHASES];
    mz_job job;
    int allowed; /* workers that may join this job */
    int nranges; /* of each phase in this job */
    int workers; /* started */
    int64_t wait_ns;
} P = {.run_lock = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* One unsuccessful check of a condition another thread will make true soon. */
typedef struct {
    int pauses;
} waiter;
static inline void wait_a_little(waiter *w) {
    if (w->pauses < SPIN_PAUSES) {
        ++w->pauses;
        cpu_relax();
    } else {
        sched_yield();
    }
}

/* Runs the items this thread can claim, phase by phase: its own range (slot), then the others'. */
static void work(int slot) {
    const mz_job *j = &P.job;
    int nr = P.nranges;
    for (int p = 0; p < j->nphases; ++p) {
        int64_t c = j->chunk[p] > 0 ? j->chunk[p] : 1;
        for (int t = 0; t < nr; ++t) {
            range *r = &P.ranges[p][(slot + t) % nr];
            for (;;) {
                int64_t i = atomic_fetch_add(&r->next, c);
                if (i >= r->end) break;
                if (p > 0 && atomic_load(&P.done[p - 1]) < j->items[p - 1]) {
                    waiter w = {0};
                    while (atomic_load(&P.done[p - 1]) < j->items[p - 1]) wait_a_little(&w);
                }
                int64_t e = i + c < r->end ? i + c : r->end;
                for (int64_t k = i; k < e; ++k) j->run(j->ctx, p, k);
                atomic_fetch_add(&P.done[p], e - i);
            }
        }
    }
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&P.seq);
    for (;;) {
        uint64_t s;
        waiter w = {0};
        int64_t idle_since = 0;
        for (;;) {
            s = atomic_load(&P.seq);
            if (!(s & 1) && s != seen) break;
            if (w.pauses < SPIN_PAUSES) {
                wait_a_little(&w);
                continue;
            }
            int64_t t = now_ns();
            if (idle_since == 0) idle_since = t;
            if (t - idle_since < P.wait_ns) {
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&P.lock);
            atomic_fetch_add(&P.sleepers, 1);
            while ((s = atomic_load(&P.seq)) == seen || (s & 1)) pthread_cond_wait(&P.wake, &P.lock);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.lock);
            break;
        }
        seen = s;
        atomic_fetch_add(&P.active, 1);
        if (atomic_load(&P.seq) == s && id < P.allowed) work((id + 1) % P.nranges);
        atomic_fetch_sub(&P.active, 1);
    }
    return NULL;
}

static void after_fork_in_child(void) {
    /* The workers did not survive the fork: start new ones when needed. */
    pthread_mutex_init(&P.run_lock, NULL);
    pthread_mutex_init(&P.lock, NULL);
    pthread_cond_init(&P.wake, NULL);
    atomic_store(&P.active, 0);
    atomic_store(&P.sleepers, 0);
    atomic_store(&P.seq, 0);
    P.workers = 0;
}

static void start_workers(int n) {
    static int configured = 0;
    if (!configured) {
        configured = 1;
        const char *policy = getenv("OMP_WAIT_POLICY"), *us = getenv("MEGREZ_WAIT_US");
        P.wait_ns = 500 * 1000LL;
        if (policy && strcasecmp(policy, "passive") == 0) P.wait_ns = 0;
        if (us && *us) { /* a whole number of microseconds up to 10 s; anything else keeps the default
                          * (kernels/__init__.py says so on stderr) */
            char *end;
            long long v = strtoll(us, &end, 10);
            if (us[0] >= '0' && us[0] <= '9' && *end == '\0' && v <= 10000000LL) P.wait_ns = v * 1000LL;
        }
        pthread_atfork(NULL, NULL, after_fork_in_child);
    }
    if (n > MAX_WORKERS) n = MAX_WORKERS;
    for (; P.workers < n; ++P.workers) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &a, worker, (void *)(intptr_t)P.workers);
        pthread_attr_destroy(&a);
        if (rc != 0) break; /* fewer threads: the caller does the rest */
    }
}

int mz_threads(int64_t weight_bytes) { return weight_bytes >= (128 << 10) ? omp_get_max_threads() : 1; }

static void run_here(const mz_job *j) {
    for (int p = 0; p < j->nphases; ++p)
        for (int64_t i = 0; i < j->items[p]; ++i) j->run(j->ctx, p, i);
}

void mz_run(const mz_job *job, int nthreads) {
    if (nthreads <= 1 || job->nphases < 1 || job->nphases > MZ_MAX_PHASES) {
        run_here(job);
        return;
    }
    pthread_mutex_lock(&P.run_lock);
    start_workers(nthreads - 1);
    if (P.workers == 0) {
        pthread_mutex_unlock(&P.run_lock);
        run_here(job);
        return;
    }
    uint64_t s = atomic_load(&P.seq);
    atomic_store(&P.seq, s + 1); /* writing */
    waiter w = {0};
    while (atomic_load(&P.active) > 0) wait_a_little(&w);
    P.job = *job;
    P.allowed = nthreads - 1;
    P.nranges = nthreads < MAX_RANGES ? nthreads : MAX_RANGES;
    for (int p = 0; p < MZ_MAX_PHASES; ++p) {
        int64_t n = p < job->nphases ? job->items[p] : 0;
        for (int r = 0; r < P.nranges; ++r) {
            atomic_store(&P.ranges[p][r].next, n * r / P.nranges);
            P.ranges[p][r].end = n * (r + 1) / P.nranges;
        }
        atomic_store(&P.done[p], 0);
    }
    atomic_store(&P.seq, s + 2); /* published */
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.lock);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
    }
    work(0);
    waiter v = {0};
    for (int p = 0; p < job->nphases; ++p)
        while (atomic_load(&P.done[p]) < job->items[p]) wait_a_little(&v);
    pthread_mutex_unlock(&P.run_lock);
}
