/* Matrix products for decoding on CPUs: y = x @ W^T with few rows in x (M <= 8) and a large
 * row-major float32 W, which is memory-bound. Every row of W is streamed from memory exactly
 * once and multiplied with all M rows of x while it sits in registers. Rows of W are split over
 * the OpenMP threads.
 *
 * megrez_linear: y[m, n] = sum_k x[m, k] * w[n, k]
 * megrez_swiglu: h[m, n] = silu(x[m] . wg[n]) * (x[m] . wu[n])   (gate and up projections fused)
 *
 * Weights are float32 or bfloat16; x and the results are float32.
 *
 * Built by megrez/kernels/build.py into each AVX2 (or wider) variant, with -ffp-contract=off.
 */
#include <immintrin.h>
#include <math.h>

#include "pool.h"
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Weights come as float32 or bfloat16 (widened to float32 on load: the top 16 bits of a float). */
#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
}
#define SCALAR_F32(v) (v)
#define SCALAR_BF16(v) bf16_to_f32(v)

/* out[r * M + m] = x[m] . w[(n0 + r)] for r < R; R rows of W at once (R * M accumulators). */
#define DOT_BLOCK(T, WT, LOAD, SCALAR, M, R)                                                        \
    static inline void dot_##T##_##M##_##R(const float *x, const WT *w, int64_t n0, int64_t K,       \
                                           float *out) {                                            \
        __m256 acc[R][M];                                                                           \
        for (int r = 0; r < R; ++r)                                                                 \
            for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();                            \
        int64_t k = 0;                                                                              \
        for (; k + 8 <= K; k += 8) {                                                                \
            __m256 xv[M];                                                                           \
            for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);                     \
            for (int r = 0; r < R; ++r) {                                                           \
                __m256 wv = LOAD(w + (n0 + r) * K + k);                                             \
                for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);      \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < R; ++r)                                                                 \
            for (int m = 0; m < M; ++m) {                                                           \
                float t = hsum(acc[r][m]);                                                          \
                for (int64_t kk = k; kk < K; ++kk) t += x[m * K + kk] * SCALAR(w[(n0 + r) * K + kk]); \
                out[r * M + m] = t;                                                                 \
            }                                                                                       \
    }

/* Rows per block: as many as fit in the 16 vector registers beside the x vectors. */
#define DOT_BLOCKS(T, WT, LOAD, SCALAR)                                                             \
    DOT_BLOCK(T, WT, LOAD, SCALAR, 1, 4) DOT_BLOCK(T, WT, LOAD, SCALAR, 1, 1)                       \
    DOT_BLOCK(T, WT, LOAD, SCALAR, 2, 4) DOT_BLOCK(T, WT, LOAD, SCALAR, 2, 1)                       \
    DOT_BLOCK(T, WT, LOAD, SCALAR, 3, 2) DOT_BLOCK(T, WT, LOAD, SCALAR, 3, 1)                       \
    DOT_BLOCK(T, WT, LOAD, SCALAR, 4, 2) DOT_BLOCK(T, WT, LOAD, SCALAR, 4, 1)                       \
    DOT_BLOCK(T, WT, LOAD, SCALAR, 5, 1) DOT_BLOCK(T, WT, LOAD, SCALAR, 6, 1)                       \
    DOT_BLOCK(T, WT, LOAD, SCALAR, 7, 1) DOT_BLOCK(T, WT, LOAD, SCALAR, 8, 1)                       \
    static void dot_##T(int64_t M, int R, const float *x, const WT *w, int64_t n0, int64_t K, float *out) { \
        switch (M * 10 + R) {                                                                       \
            case 14: dot_##T##_1_4(x, w, n0, K, out); return;                                       \
            case 11: dot_##T##_1_1(x, w, n0, K, out); return;                                       \
            case 24: dot_##T##_2_4(x, w, n0, K, out); return;                                       \
            case 21: dot_##T##_2_1(x, w, n0, K, out); return;                                       \
            case 32: dot_##T##_3_2(x, w, n0, K, out); return;                                       \
            case 31: dot_##T##_3_1(x, w, n0, K, out); return;                                       \
            case 42: dot_##T##_4_2(x, w, n0, K, out); return;                                       \
            case 41: dot_##T##_4_1(x, w, n0, K, out); return;                                       \
            case 51: dot_##T##_5_1(x, w, n0, K, out); return;                                       \
            case 61: dot_##T##_6_1(x, w, n0, K, out); return;                                       \
            case 71: dot_##T##_7_1(x, w, n0, K, out); return;                                       \
            case 81: dot_##T##_8_1(x, w, n0, K, out); return;                                       \
        }                                                                                           \
    }

DOT_BLOCKS(f32, float, LOAD_F32, SCALAR_F32)
DOT_BLOCKS(bf16, uint16_t, LOAD_BF16, SCALAR_BF16)

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Rows of W handled per work item for M rows of x. */
static inline int rows_per_block(int64_t M) { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

/* wtype 0: float32 weights, 1: bfloat16 weights. */
static void dot(int wtype, int64_t M, int R, const float *x, const void *w, int64_t n0, int64_t K, float *out) {
    if (wtype == 1)
        dot_bf16(M, R, x, (const uint16_t *)w, n0, K, out);
    else
        dot_f32(M, R, x, (const float *)w, n0, K, out);
}

typedef struct {
    int swiglu, wtype;
    const float **x;
    const void **w1, **w2;
    float **y;
    const int64_t *M, *N;
    int64_t K;
    const int64_t *start;
} grouped_call;

static void grouped_item(void *ctx, int phase, int64_t item) {
    (void)phase;
    const grouped_call *c = (const grouped_call *)ctx;
    const int swiglu = c->swiglu, wtype = c->wtype;
    const int64_t K = c->K, *start = c->start;
    const float **x = c->x;
    const void **w1 = c->w1, **w2 = c->w2;
    float **y = c->y;
    const int64_t *M = c->M, *N = c->N;
    int64_t g = 0;
    while (item >= start[g + 1]) ++g;
    int64_t j = item - start[g], m_rows = M[g], n_out = N[g];
    int R = rows_per_block(m_rows);
    int64_t blocks = n_out / R, n0;
    if (j < blocks) {
        n0 = j * R;
    } else {
        n0 = blocks * R + (j - blocks);
        R = 1;
    }
    float a[8 * 4], b[8 * 4];
    dot(wtype, m_rows, R, x[g], w1[g], n0, K, a);
    if (swiglu) dot(wtype, m_rows, R, x[g], w2[g], n0, K, b);
    for (int r = 0; r < R; ++r)
        for (int64_t m = 0; m < m_rows; ++m) {
            float v = a[r * m_rows + m];
            y[g][m * n_out + n0 + r] = swiglu ? silu(v) * b[r * m_rows + m] : v;
        }
}

/* G independent products sharing K, run as one parallel loop so that small matrices (one
 * expert, a K/V projection) do not each pay a thread fork/join:
 *   swiglu = 0: y[g][m, n] = x[g][m] . w1[g][n]
 *   swiglu = 1: y[g][m, n] = silu(x[g][m] . w1[g][n]) * (x[g][m] . w2[g][n])  */
int megrez_grouped(int swiglu, int wtype, int64_t G, const float **x, const void **w1, const void **w2, float **y,
                   const int64_t *M, const int64_t *N, int64_t K) {
    int64_t start[65];
    if (G < 1 || G > 64) return -1;
    start[0] = 0;
    for (int64_t g = 0; g < G; ++g) {
        if (M[g] < 1 || M[g] > 8) return -1;
        int R = rows_per_block(M[g]);
        start[g + 1] = start[g] + N[g] / R + N[g] % R;  /* full blocks, then single tail rows */
    }
    int64_t total = start[G], bytes = 0;
    for (int64_t g = 0; g < G; ++g) bytes += (1 + (swiglu != 0)) * N[g] * K * (wtype == 1 ? 2 : 4);
    /* Chunks: a thread the OS has descheduled (a busy machine) leaves little for the others. */
    int threads = mz_threads(bytes);
    grouped_call c = {swiglu, wtype, x, w1, w2, y, M, N, K, start};
    mz_job job = {1, {total}, {total / (16 * threads) + 1}, grouped_item, &c};
    mz_run(&job, threads);
    return 0;
}

int megrez_max_rows(void) { return 8; }

/* Single products, without the pointer arrays (cheaper to call). */
int megrez_linear(int wtype, const float *x, const void *w, float *y, int64_t M, int64_t N, int64_t K) {
    return megrez_grouped(0, wtype, 1, &x, &w, &w, &y, &M, &N, K);
}

int megrez_swiglu(int wtype, const float *x, const void *wg, const void *wu, float *h, int64_t M, int64_t N,
                  int64_t K) {
    return megrez_grouped(1, wtype, 1, &x, &wg, &wu, &h, &M, &N, K);
}
