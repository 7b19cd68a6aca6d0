/* Sixteen float32 lanes with one fixed order of operations, for the kernel files that need
 * float sums with the same bits in every build variant (decode_ops.c, routing.c).
 *
 * v16 is one AVX-512 register, two AVX2 registers or a plain array: each operation is done lane
 * by lane (separate multiply and add, -ffp-contract=off), and v16_tree sums the lanes pairwise
 * (t + t+8, then + 4, + 2, + 1), so every variant computes the same roundings. Why not plain
 * loops left to the compiler: its vectorised tree reductions and multi-accumulator loops spilled
 * to the stack and ran a decoding step's attention at about a fifth of the arithmetic's speed. */
#ifndef MEGREZ_LANES_H
#define MEGREZ_LANES_H
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define LANES 16

#if defined(__AVX512F__)
typedef __m512 v16;
static inline v16 v16_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v16_set1(float a) { return _mm512_set1_ps(a); }
static inline v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v16_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
static inline v16 v16_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v16_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
static inline float v16_tree(v16 a) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#elif defined(__AVX2__)
typedef struct {
    __m256 lo, hi; /* lanes 0-7, 8-15 */
} v16;
static inline v16 v16_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16 v16_set1(float a) { return (v16){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
static inline v16 v16_load(const float *p) { return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v16_store(float *p, v16 a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
static inline v16 v16_add(v16 a, v16 b) { return (v16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline v16 v16_mul(v16 a, v16 b) { return (v16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
static inline float v16_tree(v16 a) {
    __m256 h = _mm256_add_ps(a.lo, a.hi);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#else
typedef struct {
    float l[LANES];
} v16;
static inline v16 v16_zero(void) { return (v16){{0}}; }
static inline v16 v16_set1(float a) {
    v16 r;
    for (int t = 0; t < LANES; ++t) r.l[t] = a;
    return r;
}
static inline v16 v16_load(const float *p) {
    v16 r;
    for (int t = 0; t < LANES; ++t) r.l[t] = p[t];
    return r;
}
static inline void v16_store(float *p, v16 a) {
    for (int t = 0; t < LANES; ++t) p[t] = a.l[t];
}
static inline v16 v16_add(v16 a, v16 b) {
    for (int t = 0; t < LANES; ++t) a.l[t] += b.l[t];
    return a;
}
static inline v16 v16_mul(v16 a, v16 b) {
    for (int t = 0; t < LANES; ++t) a.l[t] *= b.l[t];
    return a;
}
static inline float v16_tree(v16 a) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int t = 0; t < w; ++t) a.l[t] += a.l[t + w];
    return a.l[0];
}
#endif

/* sum of a[d] * b[d]: lane t sums d = t, t + 16, ... in order (the n % 16 last terms go to lane
 * 0), then the tree over the lanes. */
static inline float dot(const float *a, const float *b, int64_t n) {
    v16 acc = v16_zero();
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) acc = v16_add(acc, v16_mul(v16_load(a + d), v16_load(b + d)));
    if (d < n) {
        float l[LANES];
        v16_store(l, acc);
        for (; d < n; ++d) l[0] += a[d] * b[d];
        acc = v16_load(l);
    }
    return v16_tree(acc);
}
#endif
