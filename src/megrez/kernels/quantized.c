/* Products with weights in ggml's block formats, read where they lie (byte-identical to GGUF):
 *
 *   Q8_0  34 bytes / 32 weights: fp16 d, int8 q[32]                       w = d * q
 *   Q4_0  18 bytes / 32 weights: fp16 d, q[16] (low nibbles: weights 0-15,
 *         high nibbles: 16-31)                                             w = d * (q - 8)
 *   Q5_0  22 bytes / 32 weights: fp16 d, 32 fifth bits (bit j: weight j), low 4 bits as Q4_0
 *                                                                          w = d * (q - 16)
 *   Q4_K  144 bytes / 256: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 groups of
 *         32, q[128] (each 32 bytes: low nibbles one group, high nibbles the next)
 *                                                                          w = d * sc * q - dmin * m
 *   Q6_K  210 bytes / 256: ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16] (groups of
 *         16), fp16 d                                                      w = d * sc * (q - 32)
 *
 * As in llama.cpp, activations are quantized once per row to 8 bits (symmetric, one float
 * scale per 32 values for Q8_0/Q4_0 and per 256 for the K formats, plus the sum of every 16
 * quantized values), and the products are integer dot products combined with the block scales
 * in float32. Integer sums are exact, and the float steps follow one fixed order per output
 * element (the "reference order" of the scalar functions below), so every SIMD variant returns
 * the scalar reference's result bit for bit, and an output row never depends on the other rows.
 *
 * Reference order. Q8_0/Q4_0/Q5_0: for block i, the integer dot of elements 4l..4l+3 (lane l of 8)
 * is converted to float and fused-multiply-added with scale d_w * d_x into accumulator
 * acc[i % 2][l]; the result is the tree sum ((v0+v4)+(v2+v6))+((v1+v5)+(v3+v7)) of
 * v = acc[0] + acc[1]. Q4_K/Q6_K: one accumulator, per super-block in order, as written below.
 *
 * Build variants (megrez/kernels/build.py; -ffp-contract=off always): scalar (no flags), avx2
 * (-mavx2 -mfma -mf16c), avxvnni (+ -mavxvnni), avx512 (+ -mavx512f/bw/vl/dq), avx512vnni
 * (+ -mavx512vnni). The code below picks its path from the compiler's feature macros.
 */
#include "pool.h"
#include "products.h"

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define MZ_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MZ_AVX2 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MZ_VNNI512 1
#elif defined(__AVXVNNI__)
#define MZ_VNNI256 1
#endif

enum { QT_Q4_0 = 2, QT_Q5_0 = 6, QT_Q8_0 = 8, QT_Q4_K = 12, QT_Q6_K = 14 };
/* Bytes ahead of the weight stream to prefetch (AVX-512 loops: Q8_0 with VNNI, Q4_K at one
 * row of x, Q6_K): the hardware prefetchers stop at 4 KiB pages. From DRAM at 2 threads, a
 * 16k x 1024 Q8_0 product went from 10.8-16.1 to 16.2-17.0 GB/s, a 2048 x 1024 Q4_K one from
 * 8.5-9.9 to 11.3-14.6 GB/s. */
#define PREFETCH_AHEAD 4096
#define MAX_ROWS 8 /* rows of x per pass over a weight row */

/* One quantized activation row. */
typedef struct {
    const int8_t *q;  /* [k] */
    const float *d;   /* [k / block]: scale per 32 (Q8_0, Q4_0) or per 256 (K formats) */
    const int16_t *s; /* [k / 16]: sum of each 16 quantized values */
    const float *d8;  /* 32-wide formats: [k / 4], each block's scale 8 times (AVX-512 loads two
                       * blocks' lane scales at once); NULL for the K formats */
    const int32_t *c8; /* 32-wide formats: [k / 4], lane l of block b: -128 * (q[32b + 4l] + ... +
                        * q[32b + 4l + 3]) (VNNI's Q8_0 multiplies w + 128; filled by that build only);
                        * NULL for the K formats */
    const int32_t *c0; /* 32-wide formats: [k / 4], lane 0 of block b: -(q[32b] + ... + q[32b + 31]), lanes 1-7:
                        * 0 (the AVX-512 Q4_0/Q5_0 loops start from it: their offset correction);
                        * filled by the AVX-512 builds only; NULL for the K formats */
} act;

static inline float fp16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h); /* the conversion is exact either way */
#endif
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static int block_of(int qtype) {
    switch (qtype) {
        case QT_Q8_0: case QT_Q4_0: case QT_Q5_0: return 32;
        case QT_Q4_K: case QT_Q6_K: return 256;
    }
    return 0;
}
static int64_t bytes_of(int qtype) {
    switch (qtype) {
        case QT_Q8_0: return 34;
        case QT_Q4_0: return 18;
        case QT_Q5_0: return 22;
        case QT_Q4_K: return 144;
        case QT_Q6_K: return 210;
    }
    return 0;
}
/* Activation scale block: 32 for the 32-wide formats, 256 for the K formats. */
static int act_block(int qtype) { return block_of(qtype); }

/* Where the AVX-512 Q4_K loops want a row's 8-bit activations: each 128 values as groups of 32
 * in the order 0, 2, 1, 3, so that one 64-byte load of Q4_K quants (the low nibbles of groups
 * 0 and 2, the high nibbles of 1 and 3) meets two contiguous 64-value runs of x. The integer
 * sums are the same, so the same results; the 16-sums (s) stay in the natural order. */
#if defined(MZ_AVX512)
static int act_layout(int qtype) { return qtype == QT_Q4_K; }
#else
static int act_layout(int qtype) { (void)qtype; return 0; }
#endif

static void swap_middle_groups(int8_t *q, int64_t k) {
    int8_t t[32];
    for (int64_t i = 0; i + 128 <= k; i += 128) {
        memcpy(t, q + i + 32, 32);
        memcpy(q + i + 32, q + i + 64, 32);
        memcpy(q + i + 64, t, 32);
    }
}

/* ------------------------------------------------------------------ activation quantization */

/* d = max|x| / 127 per block, q = round-half-even(x / d) in [-127, 127]; identical in every
 * variant (IEEE division and rounding, no fast-math). */
static void quantize_row(const float *x, int64_t k, int bs, int8_t *q, float *d, int16_t *s) {
    for (int64_t b = 0; b < k / bs; ++b) {
        const float *xb = x + b * bs;
        float amax = 0.0f;
        int nan = 0;
        for (int i = 0; i < bs; ++i) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
            nan |= a != a;
        }
        if (nan) amax = NAN; /* a NaN activation makes the products NaN, as a float product would */
        float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
        for (int i = 0; i < bs; ++i) {
            float v = nearbyintf(xb[i] * id);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            q[b * bs + i] = (int8_t)(v == v ? v : 0.0f);
        }
    }
    for (int64_t g = 0; g < k / 16; ++g) {
        int t = 0;
        for (int i = 0; i < 16; ++i) t += q[g * 16 + i];
        s[g] = (int16_t)t;
    }
}

/* ------------------------------------------------------------------ scalar reference */

static inline float tree_sum8(const float v[8]) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

static float dot_q8_0_ref(const uint8_t *w, const act *x, int64_t nb) {
    float acc[2][8] = {{0}};
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t *blk = w + 34 * i;
        const int8_t *qw = (const int8_t *)(blk + 2), *qx = x->q + 32 * i;
        float sc = fp16_to_f32(blk) * x->d[i];
        for (int l = 0; l < 8; ++l) {
            int32_t t = 0;
            for (int e = 4 * l; e < 4 * l + 4; ++e) t += qw[e] * qx[e];
            acc[i & 1][l] = fmaf((float)t, sc, acc[i & 1][l]);
        }
    }
    float v[8];
    for (int l = 0; l < 8; ++l) v[l] = acc[0][l] + acc[1][l];
    return tree_sum8(v);
}

/* Q4_0: sum (q - 8) x = sum q x - 8 sum x; the -8 sum x of the block goes into lane 0. */
static float dot_q4_0_ref(const uint8_t *w, const act *x, int64_t nb) {
    float acc[2][8] = {{0}};
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t *blk = w + 18 * i, *qs = blk + 2;
        const int8_t *qx = x->q + 32 * i;
        float sc = fp16_to_f32(blk) * x->d[i];
        for (int l = 0; l < 8; ++l) {
            int32_t t = 0;
            for (int e = 4 * l; e < 4 * l + 4; ++e) t += (e < 16 ? qs[e] & 0xf : qs[e - 16] >> 4) * qx[e];
            if (l == 0) t -= 8 * (x->s[2 * i] + x->s[2 * i + 1]);
            acc[i & 1][l] = fmaf((float)t, sc, acc[i & 1][l]);
        }
    }
    float v[8];
    for (int l = 0; l < 8; ++l) v[l] = acc[0][l] + acc[1][l];
    return tree_sum8(v);
}

/* Q5_0: as Q4_0 with a fifth bit per weight and -16. */
static inline int q5_0_value(const uint8_t *blk, int e) {
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    const uint8_t *qs = blk + 6;
    return (e < 16 ? qs[e] & 0xf : qs[e - 16] >> 4) | (((qh >> e) & 1) << 4);
}

static float dot_q5_0_ref(const uint8_t *w, const act *x, int64_t nb) {
    float acc[2][8] = {{0}};
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t *blk = w + 22 * i;
        const int8_t *qx = x->q + 32 * i;
        float sc = fp16_to_f32(blk) * x->d[i];
        for (int l = 0; l < 8; ++l) {
            int32_t t = 0;
            for (int e = 4 * l; e < 4 * l + 4; ++e) t += q5_0_value(blk, e) * qx[e];
            if (l == 0) t -= 16 * (x->s[2 * i] + x->s[2 * i + 1]);
            acc[i & 1][l] = fmaf((float)t, sc, acc[i & 1][l]);
        }
    }
    float v[8];
    for (int l = 0; l < 8; ++l) v[l] = acc[0][l] + acc[1][l];
    return tree_sum8(v);
}

static inline void q4_k_scales(const uint8_t *s12, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s12[j] & 63;
        mn[j] = s12[j + 4] & 63;
    }
    for (int j = 4; j < 8; ++j) {
        sc[j] = (s12[j + 4] & 0xf) | ((s12[j - 4] >> 6) << 4);
        mn[j] = (s12[j + 4] >> 4) | ((s12[j] >> 6) << 4);
    }
}

/* Q4_K: per super-block, sq = sum_j sc_j * (q . x over group j), sm = sum_j m_j * (sum x over
 * group j); acc += d_x * (d * sq - dmin * sm). */
static inline float q4_k_combine(float acc, float dx, const uint8_t *blk, int32_t sq, int32_t sm) {
    float t1 = fp16_to_f32(blk) * (float)sq, t2 = fp16_to_f32(blk + 2) * (float)sm;
    return acc + dx * (t1 - t2);
}

static float dot_q4_k_ref(const uint8_t *w, const act *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + 144 * b, *qs = blk + 16;
        const int8_t *qx = x->q + 256 * b;
        const int16_t *xs = x->s + 16 * b;
        uint8_t sc[8], mn[8];
        q4_k_scales(blk + 4, sc, mn);
        int32_t sq = 0, sm = 0;
        for (int j = 0; j < 8; ++j) {
            const uint8_t *qj = qs + 32 * (j / 2);
            int shift = (j & 1) * 4;
            int32_t t = 0;
            for (int l = 0; l < 32; ++l) t += ((qj[l] >> shift) & 0xf) * qx[32 * j + l];
            sq += sc[j] * t;
            sm += mn[j] * (xs[2 * j] + xs[2 * j + 1]);
        }
        acc = q4_k_combine(acc, x->d[b], blk, sq, sm);
    }
    return acc;
}

/* Q6_K: s = sum_g sc_g * (q . x over group g - 32 * sum x over g); acc += (d * d_x) * s. */
static inline float q6_k_combine(float acc, float dx, const uint8_t *blk, int32_t s) {
    float f = fp16_to_f32(blk + 208) * dx;
    return acc + f * (float)s;
}

static inline int q6_k_value(const uint8_t *blk, int e) {
    int h = e / 128, c = (e % 128) / 32, l = e % 32;
    const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
    int lo = (c & 1) ? ql[l + 32] : ql[l];
    lo = (c & 2) ? lo >> 4 : lo & 0xf;
    return lo | (((qh[l] >> (2 * c)) & 3) << 4);
}

static float dot_q6_k_ref(const uint8_t *w, const act *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + 210 * b;
        const int8_t *qx = x->q + 256 * b, *sc = (const int8_t *)(blk + 192);
        int32_t s = 0;
        for (int g = 0; g < 16; ++g) {
            int32_t t = 0;
            for (int e = 16 * g; e < 16 * g + 16; ++e) t += q6_k_value(blk, e) * qx[e];
            s += sc[g] * (t - 32 * x->s[16 * b + g]);
        }
        acc = q6_k_combine(acc, x->d[b], blk, s);
    }
    return acc;
}

static float dot_ref(int qtype, const uint8_t *w, const act *x, int64_t k) {
    switch (qtype) {
        case QT_Q8_0: return dot_q8_0_ref(w, x, k / 32);
        case QT_Q4_0: return dot_q4_0_ref(w, x, k / 32);
        case QT_Q5_0: return dot_q5_0_ref(w, x, k / 32);
        case QT_Q4_K: return dot_q4_k_ref(w, x, k / 256);
        default: return dot_q6_k_ref(w, x, k / 256);
    }
}

/* ------------------------------------------------------------------ AVX2 (256-bit) */
#if defined(MZ_AVX2)
#define INLINE static inline __attribute__((always_inline))

INLINE float hsum256(__m256 v) { /* ((v0+v4)+(v2+v6))+((v1+v5)+(v3+v7)) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
INLINE int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
INLINE float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
/* 8 int32 lanes, lane l = sum of a[4l..4l+3] * b[4l..4l+3] (a unsigned, b signed bytes). */
INLINE __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(MZ_VNNI512)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(MZ_VNNI256)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}
/* acc + pairwise int16 products summed into int32 lanes. */
INLINE __m256i madd_acc(__m256i acc, __m256i a, __m256i b) {
#if defined(MZ_VNNI512)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(MZ_VNNI256)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
INLINE __m256i loadu(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* Q4_K's 6-bit scales and mins as bytes sc0..sc7, m0..m7 (llama.cpp's mask trick on the three
 * dwords u0..u2 of the 12 bytes), in vector registers: dwords [u0 & k1, (u2 & k2) | ((u0 >> 6)
 * & k3) << 4, u1 & k1, ((u2 >> 4) & k2) | ((u1 >> 6) & k3) << 4]. Reads 16 bytes from s12 (the
 * scales and the first quants of the block). */
INLINE __m128i q4_k_scales_mins(const uint8_t *s12) {
    const __m128i k1 = _mm_set1_epi32(0x3f3f3f3f), k2 = _mm_set1_epi32(0x0f0f0f0f), k3 = _mm_set1_epi32(0x03030303);
    __m128i v = _mm_loadu_si128((const __m128i *)s12);
    __m128i p = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)); /* u0 u2 u1 u2 */
    __m128i q = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)); /* u0 u0 u1 u1 */
    __m128i low = _mm_and_si128(_mm_srlv_epi32(p, _mm_setr_epi32(0, 0, 0, 4)), k2);
    __m128i high = _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(q, 6), k3), 4);
    return _mm_blend_epi32(_mm_and_si128(p, k1), _mm_or_si128(low, high), 0xA);
}
/* Exact totals of the int32 lanes of a (8 lanes) and b (4 lanes). */
INLINE void hsum2_i32(__m256i a, __m128i b, int32_t *ta, int32_t *tb) {
    __m128i h = _mm_hadd_epi32(_mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)), b);
    h = _mm_hadd_epi32(h, h);
    *ta = _mm_cvtsi128_si32(h);
    *tb = _mm_extract_epi32(h, 1);
}
/* sum_j m_j * (sum of x over group j of 32), 4 int32 lanes, from the 16-sums of x. */
INLINE __m128i q4_k_min_lanes(__m128i scales_mins, const int16_t *xs) {
    __m256i bs = loadu(xs);
    __m128i s32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    return _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_srli_si128(scales_mins, 8)), s32);
}

/* One 32-block of Q8_0 for row m: integer lanes of w . x. */
INLINE __m256i q8_0_lanes(__m256i aw, __m256i qw, const int8_t *qx) {
    return dot_u8s8(aw, _mm256_sign_epi8(loadu(qx), qw));
}
INLINE __m256i q4_0_lanes(__m256i q, const act *x, int64_t i) {
    __m256i t = dot_u8s8(q, loadu(x->q + 32 * i));
    return _mm256_sub_epi32(t, _mm256_setr_epi32(8 * (x->s[2 * i] + x->s[2 * i + 1]), 0, 0, 0, 0, 0, 0, 0));
}
INLINE __m256i q4_0_unpack(const uint8_t *qs) {
    __m128i b = _mm_loadu_si128((const __m128i *)qs), m4 = _mm_set1_epi8(0xf);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
}
/* Q5_0's 32 values (0-31) of a block as bytes. */
INLINE __m256i q5_0_unpack(const uint8_t *blk) {
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
#if defined(MZ_AVX512)
    __m256i hi = _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10));
#else /* byte j = 0xff where bit j is set (llama.cpp's bytes_from_bits_32) */
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
                                        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                          0x0101010101010101LL, 0));
    bytes = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL)),
                              _mm256_set1_epi64x(-1));
    __m256i hi = _mm256_and_si256(bytes, _mm256_set1_epi8(0x10));
#endif
    return _mm256_or_si256(q4_0_unpack(blk + 6), hi);
}
INLINE __m256i q5_0_lanes(__m256i q, const act *x, int64_t i) {
    __m256i t = dot_u8s8(q, loadu(x->q + 32 * i));
    return _mm256_sub_epi32(t, _mm256_setr_epi32(16 * (x->s[2 * i] + x->s[2 * i + 1]), 0, 0, 0, 0, 0, 0, 0));
}
#endif

/* ------------------------------------------------------------------ AVX-512 (512-bit) */
#if defined(MZ_AVX512)
INLINE __m512i dot_u8s8_512(__m512i a, __m512i b) {
#if defined(MZ_VNNI512)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, b);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1));
#endif
}
INLINE __m512i madd_acc512(__m512i acc, __m512i a, __m512i b) {
#if defined(MZ_VNNI512)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
INLINE __m512i join256(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
INLINE __m512 join_ps(float lo, float hi) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1);
}
#endif

/* ------------------------------------------------------------------ one weight row x mc rows */
/* out[m] = W_row . x[m] for m < mc, each in the reference order. mc is a compile-time
 * constant in every call (see rows_dispatch), so the accumulators live in registers. */

#if defined(MZ_AVX512)
INLINE void q8_0_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    __m512 acc[MAX_ROWS];
    for (int m = 0; m < mc; ++m) acc[m] = _mm512_setzero_ps();
    int64_t i = 0;
#if defined(MZ_VNNI512)
    /* 16 blocks at a time: their scales gathered and converted at once, and the weights taken
     * as unsigned w + 128 (w ^ 0x80) against x from the lane corrections c8 = -128 * sum x: the
     * sign trick's integer lanes exactly, in fewer instructions. */
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i at = _mm512_setr_epi32(0, 34, 68, 102, 136, 170, 204, 238, 272, 306, 340, 374, 408, 442, 476, 510);
    for (; i + 16 <= nb; i += 16) {
        const uint8_t *g = w + 34 * i;
        for (int t = 0; t < 544; t += 64) _mm_prefetch((const char *)(g + PREFETCH_AHEAD + t), _MM_HINT_T0);
        __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(at, (const void *)g, 1)));
        __m512 sc[MAX_ROWS];
        for (int m = 0; m < mc; ++m) sc[m] = _mm512_mul_ps(dw, _mm512_loadu_ps(x[m].d + i)); /* d_w * d_x, as scalar */
        __m512i pick = join256(_mm256_setzero_si256(), _mm256_set1_epi32(1));
        for (int j = 0; j < 16; j += 2, pick = _mm512_add_epi32(pick, _mm512_set1_epi32(2))) {
            const uint8_t *b0 = g + 34 * j;
            __m512i u = _mm512_xor_si512(join256(loadu(b0 + 2), loadu(b0 + 36)), flip);
            for (int m = 0; m < mc; ++m) {
                __m512i t = _mm512_dpbusd_epi32(_mm512_loadu_si512((const void *)(x[m].c8 + 8 * (i + j))), u,
                                                _mm512_loadu_si512((const void *)(x[m].q + 32 * (i + j))));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(pick, sc[m]), acc[m]);
            }
        }
    }
#endif
    for (; i + 1 < nb; i += 2) {
        const uint8_t *b0 = w + 34 * i, *b1 = b0 + 34;
        __m512i qw = join256(loadu(b0 + 2), loadu(b1 + 2));
        __m512i aw = _mm512_abs_epi8(qw);
        __mmask64 neg = _mm512_movepi8_mask(qw);
        __m512 dw = join_ps(h2f(b0), h2f(b1));
        for (int m = 0; m < mc; ++m) {
            __m512i qx = _mm512_loadu_si512((const void *)(x[m].q + 32 * i));
            __m512i t = dot_u8s8_512(aw, _mm512_mask_sub_epi8(qx, neg, _mm512_setzero_si512(), qx));
            __m512 sc = _mm512_mul_ps(dw, _mm512_loadu_ps(x[m].d8 + 8 * i)); /* d_w * d_x per lane, as scalar */
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[m]);
        }
    }
    for (int m = 0; m < mc; ++m) {
        __m256 lo = _mm512_castps512_ps256(acc[m]), hi = _mm512_extractf32x8_ps(acc[m], 1);
        if (i < nb) {
            const uint8_t *b0 = w + 34 * i;
            __m256i qw = loadu(b0 + 2);
            __m256i t = q8_0_lanes(_mm256_abs_epi8(qw), qw, x[m].q + 32 * i);
            lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(h2f(b0) * x[m].d[i]), lo);
        }
        out[m] = hsum256(_mm256_add_ps(lo, hi));
    }
}

/* Q4_0 (five = 0) and Q5_0 (five = 1): values 0-15 or 0-31, offset 8 or 16 summed into lane 0. */
INLINE void q4_0_family_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out, const int five) {
    const int64_t bb = five ? 22 : 18;
    const int off = five ? 16 : 8;
    __m512 acc[MAX_ROWS];
    for (int m = 0; m < mc; ++m) acc[m] = _mm512_setzero_ps();
    int64_t i = 0;
    /* 16 blocks at a time: their scales gathered and converted at once, and each lane's
     * integer dot started from the offset correction (c0 * off: the same integers as
     * subtracting it after). The pairs of blocks below, in the same lanes, the same bits. */
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)bb));
    for (; i + 16 <= nb; i += 16) {
        const uint8_t *g = w + bb * i;
        for (int t = 0; t < 16 * bb; t += 64) _mm_prefetch((const char *)(g + PREFETCH_AHEAD + t), _MM_HINT_T0);
        __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(at, (const void *)g, 1)));
        __m512 sc[MAX_ROWS];
        for (int m = 0; m < mc; ++m) sc[m] = _mm512_mul_ps(dw, _mm512_loadu_ps(x[m].d + i)); /* d_w * d_x, as scalar */
        __m512i pick = join256(_mm256_setzero_si256(), _mm256_set1_epi32(1));
        for (int j = 0; j < 16; j += 2, pick = _mm512_add_epi32(pick, _mm512_set1_epi32(2))) {
            const uint8_t *b0 = g + bb * j, *b1 = b0 + bb;
            __m512i q = five ? join256(q5_0_unpack(b0), q5_0_unpack(b1)) : join256(q4_0_unpack(b0 + 2), q4_0_unpack(b1 + 2));
            for (int m = 0; m < mc; ++m) {
                __m512i c0 = _mm512_loadu_si512((const void *)(x[m].c0 + 8 * (i + j)));
                __m512i c = five ? _mm512_slli_epi32(c0, 4) : _mm512_slli_epi32(c0, 3); /* * off */
                __m512i xq = _mm512_loadu_si512((const void *)(x[m].q + 32 * (i + j)));
#if defined(MZ_VNNI512)
                __m512i t = _mm512_dpbusd_epi32(c, q, xq);
#else
                __m512i t = _mm512_add_epi32(dot_u8s8_512(q, xq), c);
#endif
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(pick, sc[m]), acc[m]);
            }
        }
    }
    for (; i + 1 < nb; i += 2) {
        const uint8_t *b0 = w + bb * i, *b1 = b0 + bb;
        __m512i q = five ? join256(q5_0_unpack(b0), q5_0_unpack(b1)) : join256(q4_0_unpack(b0 + 2), q4_0_unpack(b1 + 2));
        __m512 dw = join_ps(h2f(b0), h2f(b1));
        for (int m = 0; m < mc; ++m) {
            const int16_t *s = x[m].s + 2 * i;
            __m512i t = dot_u8s8_512(q, _mm512_loadu_si512((const void *)(x[m].q + 32 * i)));
            __m512i corr = _mm512_setr_epi32(off * (s[0] + s[1]), 0, 0, 0, 0, 0, 0, 0, off * (s[2] + s[3]), 0, 0,
                                             0, 0, 0, 0, 0);
            t = _mm512_sub_epi32(t, corr);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dw, _mm512_loadu_ps(x[m].d8 + 8 * i)), acc[m]);
        }
    }
    for (int m = 0; m < mc; ++m) {
        __m256 lo = _mm512_castps512_ps256(acc[m]), hi = _mm512_extractf32x8_ps(acc[m], 1);
        if (i < nb) {
            const uint8_t *b0 = w + bb * i;
            __m256i t = five ? q5_0_lanes(q5_0_unpack(b0), &x[m], i) : q4_0_lanes(q4_0_unpack(b0 + 2), &x[m], i);
            lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(h2f(b0) * x[m].d[i]), lo);
        }
        out[m] = hsum256(_mm256_add_ps(lo, hi));
    }
}


INLINE void q4_0_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    q4_0_family_rows(w, x, mc, nb, out, 0);
}
INLINE void q5_0_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    q4_0_family_rows(w, x, mc, nb, out, 1);
}

/* Half h of a Q4_K super-block: 64 bytes of quants as groups (4h, 4h + 2) and (4h + 1, 4h + 3),
 * with their scales in the int16 lanes that maddubs gives each 32 values. x is in act_layout 1. */
INLINE void q4_k_half(const uint8_t *qs, __m512i sc16, int h, __m512i *qa, __m512i *qb, __m512i *sa, __m512i *sb) {
    const __m512i m4 = _mm512_set1_epi8(0xf);
    __m512i raw = _mm512_loadu_si512((const void *)(qs + 64 * h));
    *qa = _mm512_and_si512(raw, m4);
    *qb = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
    *sa = _mm512_permutexvar_epi16(join256(_mm256_set1_epi16((short)(4 * h)), _mm256_set1_epi16((short)(4 * h + 2))), sc16);
    *sb = _mm512_permutexvar_epi16(join256(_mm256_set1_epi16((short)(4 * h + 1)), _mm256_set1_epi16((short)(4 * h + 3))),
                                   sc16);
}

INLINE void q4_k_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    float acc[MAX_ROWS];
    for (int m = 0; m < mc; ++m) acc[m] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + 144 * b, *qs = blk + 16;
        __m128i sm8 = q4_k_scales_mins(blk + 4);
        __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(sm8)); /* int16: sc0..7, m0..7 */
        __m512i sq[MAX_ROWS];
        for (int m = 0; m < mc; ++m) sq[m] = _mm512_setzero_si512();
        for (int h = 0; h < 2; ++h) {
            __m512i qa, qb, sa, sb;
            q4_k_half(qs, sc16, h, &qa, &qb, &sa, &sb);
            for (int m = 0; m < mc; ++m) {
                const int8_t *xq = x[m].q + 256 * b + 128 * h;
                sq[m] = madd_acc512(sq[m], _mm512_maddubs_epi16(qa, _mm512_loadu_si512((const void *)xq)), sa);
                sq[m] = madd_acc512(sq[m], _mm512_maddubs_epi16(qb, _mm512_loadu_si512((const void *)(xq + 64))), sb);
            }
        }
        for (int m = 0; m < mc; ++m) {
            int32_t tq, tm;
            hsum2_i32(_mm256_add_epi32(_mm512_castsi512_si256(sq[m]), _mm512_extracti64x4_epi64(sq[m], 1)),
                      q4_k_min_lanes(sm8, x[m].s + 16 * b), &tq, &tm);
            acc[m] = q4_k_combine(acc[m], x[m].d[b], blk, tq, tm);
        }
    }
    for (int m = 0; m < mc; ++m) out[m] = acc[m];
}

/* Q4_K at one row of x, four weight rows at a time (decoding): the rows' integer totals are
 * reduced together and their float steps run in four lanes, lane r in row r's reference order
 * (the same bits as q4_k_rows), so the horizontal sums and the scalar combine are paid once
 * for four rows. */
INLINE void q4_k_rows4(const uint8_t *w, int64_t rb, const act *x, int64_t nb, float *out) {
    const __m128i mins = _mm_setr_epi8(8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1);
    const __m128i at = _mm_setr_epi32(0, (int)rb, (int)(2 * rb), (int)(3 * rb));
    const __m256i halves = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    __m128 acc = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const int8_t *xq = x->q + 256 * b;
        __m256i xs = loadu(x->s + 16 * b);
        __m128i x32 = _mm_hadd_epi16(_mm256_castsi256_si128(xs), _mm256_extracti128_si256(xs, 1)); /* sums of 32 */
        __m256i tq[4];
        __m128i tm[4];
        for (int r = 0; r < 4; ++r) {
            const uint8_t *blk = w + r * rb + 144 * b, *qs = blk + 16;
            for (int t = 0; t < 144; t += 64) _mm_prefetch((const char *)(blk + PREFETCH_AHEAD + t), _MM_HINT_T0);
            __m128i sm8 = q4_k_scales_mins(blk + 4);
            __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(sm8));
            __m512i sq = _mm512_setzero_si512();
            for (int h = 0; h < 2; ++h) {
                __m512i qa, qb, sa, sb;
                q4_k_half(qs, sc16, h, &qa, &qb, &sa, &sb);
                sq = madd_acc512(sq, _mm512_maddubs_epi16(qa, _mm512_loadu_si512((const void *)(xq + 128 * h))), sa);
                sq = madd_acc512(sq, _mm512_maddubs_epi16(qb, _mm512_loadu_si512((const void *)(xq + 128 * h + 64))), sb);
            }
            tq[r] = _mm256_add_epi32(_mm512_castsi512_si256(sq), _mm512_extracti64x4_epi64(sq, 1));
            tm[r] = _mm_madd_epi16(_mm_shuffle_epi8(sm8, mins), x32);
        }
        __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(tq[0], tq[1]), _mm256_hadd_epi32(tq[2], tq[3]));
        __m128i sq4 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        __m128i sm4 = _mm_hadd_epi32(_mm_hadd_epi32(tm[0], tm[1]), _mm_hadd_epi32(tm[2], tm[3]));
        /* each row's (d, dmin) fp16 pair as one dword: d0 dmin0 d1 dmin1 ... -> d0..d3 | dmin0..dmin3 */
        __m256 dm = _mm256_permutevar8x32_ps(
            _mm256_cvtph_ps(_mm_i32gather_epi32((const int *)(const void *)(w + 144 * b), at, 1)), halves);
        __m128 t1 = _mm_mul_ps(_mm256_castps256_ps128(dm), _mm_cvtepi32_ps(sq4));
        __m128 t2 = _mm_mul_ps(_mm256_extractf128_ps(dm, 1), _mm_cvtepi32_ps(sm4));
        acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(x->d[b]), _mm_sub_ps(t1, t2)));
    }
    _mm_storeu_ps(out, acc);
}

INLINE void q6_k_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    float acc[MAX_ROWS];
    for (int m = 0; m < mc; ++m) acc[m] = 0.0f;
    const __m512i m4 = _mm512_set1_epi8(0xf), m30 = _mm512_set1_epi8(0x30);
    /* int16 lanes of a 64-value vector: 4 groups of 16 values, 8 lanes each */
    const __m512i pick = _mm512_set_epi64(0x0003000300030003LL, 0x0003000300030003LL, 0x0002000200020002LL,
                                          0x0002000200020002LL, 0x0001000100010001LL, 0x0001000100010001LL, 0, 0);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + 210 * b;
        for (int t = 0; t < 210; t += 64) _mm_prefetch((const char *)(blk + PREFETCH_AHEAD + t), _MM_HINT_T0);
        __m128i sc8 = _mm_loadu_si128((const __m128i *)(blk + 192));
        __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8));
        __m512i s[MAX_ROWS];
        for (int m = 0; m < mc; ++m) s[m] = _mm512_setzero_si512();
        for (int h = 0; h < 2; ++h) {
            __m512i ql = _mm512_loadu_si512((const void *)(blk + 64 * h));    /* values 0-63 low, 64-127 high nibbles */
            __m256i qh256 = loadu(blk + 128 + 32 * h);
            __m512i qh = join256(qh256, _mm256_srli_epi16(qh256, 2));         /* 2-bit fields 0,1 | 2,3 */
            __m512i qa = _mm512_or_si512(_mm512_and_si512(ql, m4),
                                         _mm512_and_si512(_mm512_slli_epi16(qh, 4), m30)); /* values 0-63 */
            __m512i qb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                         _mm512_and_si512(qh, m30));                       /* values 64-127 */
            /* qh's fields: value l uses bits 0-1, l+32 bits 2-3, l+64 bits 4-5, l+96 bits 6-7 */
            __m512i sa = _mm512_permutexvar_epi16(_mm512_add_epi16(pick, _mm512_set1_epi16((short)(8 * h))), sc16);
            __m512i sb = _mm512_permutexvar_epi16(_mm512_add_epi16(pick, _mm512_set1_epi16((short)(8 * h + 4))), sc16);
            for (int m = 0; m < mc; ++m) {
                const int8_t *xq = x[m].q + 256 * b + 128 * h;
                __m512i pa = _mm512_maddubs_epi16(qa, _mm512_loadu_si512((const void *)xq));
                __m512i pb = _mm512_maddubs_epi16(qb, _mm512_loadu_si512((const void *)(xq + 64)));
                s[m] = madd_acc512(madd_acc512(s[m], pa, sa), pb, sb);
            }
        }
        __m256i sc256 = _mm512_castsi512_si256(sc16);
        for (int m = 0; m < mc; ++m) {
            int32_t ts, toff;
            __m256i off = _mm256_madd_epi16(loadu(x[m].s + 16 * b), sc256);
            hsum2_i32(_mm256_add_epi32(_mm512_castsi512_si256(s[m]), _mm512_extracti64x4_epi64(s[m], 1)),
                      _mm_add_epi32(_mm256_castsi256_si128(off), _mm256_extracti128_si256(off, 1)), &ts, &toff);
            acc[m] = q6_k_combine(acc[m], x[m].d[b], blk, ts - 32 * toff);
        }
    }
    for (int m = 0; m < mc; ++m) out[m] = acc[m];
}
#define ROWS_MAX MAX_ROWS

#elif defined(MZ_AVX2)
INLINE void q8_0_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    __m256 acc0[4], acc1[4];
    for (int m = 0; m < mc; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        const uint8_t *b0 = w + 34 * i, *b1 = b0 + 34;
        __m256i qw0 = loadu(b0 + 2), qw1 = loadu(b1 + 2);
        __m256i aw0 = _mm256_abs_epi8(qw0), aw1 = _mm256_abs_epi8(qw1);
        float d0 = h2f(b0), d1 = h2f(b1);
        for (int m = 0; m < mc; ++m) {
            __m256i t0 = q8_0_lanes(aw0, qw0, x[m].q + 32 * i), t1 = q8_0_lanes(aw1, qw1, x[m].q + 32 * i + 32);
            acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_set1_ps(d0 * x[m].d[i]), acc0[m]);
            acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_set1_ps(d1 * x[m].d[i + 1]), acc1[m]);
        }
    }
    if (i < nb) {
        const uint8_t *b0 = w + 34 * i;
        __m256i qw = loadu(b0 + 2), aw = _mm256_abs_epi8(qw);
        float d0 = h2f(b0);
        for (int m = 0; m < mc; ++m)
            acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_0_lanes(aw, qw, x[m].q + 32 * i)),
                                      _mm256_set1_ps(d0 * x[m].d[i]), acc0[m]);
    }
    for (int m = 0; m < mc; ++m) out[m] = hsum256(_mm256_add_ps(acc0[m], acc1[m]));
}

INLINE void q4_0_family_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out, const int five) {
    const int64_t bb = five ? 22 : 18;
    __m256 acc0[4], acc1[4];
    for (int m = 0; m < mc; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        const uint8_t *b0 = w + bb * i, *b1 = b0 + bb;
        __m256i q0 = five ? q5_0_unpack(b0) : q4_0_unpack(b0 + 2), q1 = five ? q5_0_unpack(b1) : q4_0_unpack(b1 + 2);
        float d0 = h2f(b0), d1 = h2f(b1);
        for (int m = 0; m < mc; ++m) {
            acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps((five ? q5_0_lanes(q0, &x[m], i) : q4_0_lanes(q0, &x[m], i))), _mm256_set1_ps(d0 * x[m].d[i]),
                                      acc0[m]);
            acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps((five ? q5_0_lanes(q1, &x[m], i + 1) : q4_0_lanes(q1, &x[m], i + 1))),
                                      _mm256_set1_ps(d1 * x[m].d[i + 1]), acc1[m]);
        }
    }
    if (i < nb) {
        const uint8_t *b0 = w + bb * i;
        __m256i q0 = five ? q5_0_unpack(b0) : q4_0_unpack(b0 + 2);
        float d0 = h2f(b0);
        for (int m = 0; m < mc; ++m)
            acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps((five ? q5_0_lanes(q0, &x[m], i) : q4_0_lanes(q0, &x[m], i))), _mm256_set1_ps(d0 * x[m].d[i]),
                                      acc0[m]);
    }
    for (int m = 0; m < mc; ++m) out[m] = hsum256(_mm256_add_ps(acc0[m], acc1[m]));
}

INLINE void q4_0_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    q4_0_family_rows(w, x, mc, nb, out, 0);
}
INLINE void q5_0_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    q4_0_family_rows(w, x, mc, nb, out, 1);
}

INLINE void q4_k_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    float acc[4];
    for (int m = 0; m < mc; ++m) acc[m] = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0xf);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + 144 * b, *qs = blk + 16;
        __m128i sm8 = q4_k_scales_mins(blk + 4);
        __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm8)); /* int16 sc0..7, twice */
        __m256i sq[4];
        for (int m = 0; m < mc; ++m) sq[m] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            __m256i raw = loadu(qs + 32 * j);
            __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            __m256i slo = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(((4 * j + 1) << 8) | (4 * j))));
            __m256i shi = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(((4 * j + 3) << 8) | (4 * j + 2))));
            for (int m = 0; m < mc; ++m) {
                const int8_t *xq = x[m].q + 256 * b + 64 * j;
                sq[m] = madd_acc(sq[m], _mm256_maddubs_epi16(lo, loadu(xq)), slo);
                sq[m] = madd_acc(sq[m], _mm256_maddubs_epi16(hi, loadu(xq + 32)), shi);
            }
        }
        for (int m = 0; m < mc; ++m) {
            int32_t tq, tm;
            hsum2_i32(sq[m], q4_k_min_lanes(sm8, x[m].s + 16 * b), &tq, &tm);
            acc[m] = q4_k_combine(acc[m], x[m].d[b], blk, tq, tm);
        }
    }
    for (int m = 0; m < mc; ++m) out[m] = acc[m];
}

INLINE void q6_k_rows(const uint8_t *w, const act *x, int mc, int64_t nb, float *out) {
    float acc[4];
    for (int m = 0; m < mc; ++m) acc[m] = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0xf), m3 = _mm256_set1_epi8(3), m30 = _mm256_set1_epi8(0x30);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *blk = w + 210 * b;
        const int8_t *sc = (const int8_t *)(blk + 192);
        __m256i s[4];
        for (int m = 0; m < mc; ++m) s[m] = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
            __m256i ql0 = loadu(blk + 64 * h), ql1 = loadu(blk + 64 * h + 32), qh = loadu(blk + 128 + 32 * h);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            for (int c = 0; c < 4; ++c) {
                const int8_t *g = sc + 8 * h + 2 * c;
                __m256i s16 = _mm256_set_m128i(_mm_set1_epi16(g[1]), _mm_set1_epi16(g[0]));
                for (int m = 0; m < mc; ++m) {
                    __m256i p = _mm256_maddubs_epi16(q[c], loadu(x[m].q + 256 * b + 128 * h + 32 * c));
                    s[m] = madd_acc(s[m], p, s16);
                }
            }
        }
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        for (int m = 0; m < mc; ++m) {
            int32_t off = hsum_i32(_mm256_madd_epi16(loadu(x[m].s + 16 * b), sc16));
            acc[m] = q6_k_combine(acc[m], x[m].d[b], blk, hsum_i32(s[m]) - 32 * off);
        }
    }
    for (int m = 0; m < mc; ++m) out[m] = acc[m];
}
#define ROWS_MAX 4
#endif

#if defined(MZ_AVX2) || defined(MZ_AVX512)
/* out[r * mc + m] = W[r] . x[m] for the nr consecutive rows of W from w (row bytes rb). */
#define ROWS_CASE(F, MC) \
    case MC: for (int64_t r = 0; r < nr; ++r) F##_rows(w + r * rb, x, MC, nb, out + r * MC); return;
#define ROWS_SWITCH(F)                                                                                    \
    static void F##_dispatch(const uint8_t *w, int64_t rb, int64_t nr, const act *x, int mc, int64_t nb, \
                             float *out) {                                                                \
        switch (mc) {                                                                                     \
            ROWS_CASE(F, 1) ROWS_CASE(F, 2) ROWS_CASE(F, 3) ROWS_CASE(F, 4)                               \
            ROWS_MORE(F)                                                                                  \
        }                                                                                                 \
    }
#if ROWS_MAX == 8
#define ROWS_MORE(F) ROWS_CASE(F, 5) ROWS_CASE(F, 6) ROWS_CASE(F, 7) ROWS_CASE(F, 8)
#else
#define ROWS_MORE(F)
#endif
ROWS_SWITCH(q8_0)
ROWS_SWITCH(q4_0)
ROWS_SWITCH(q5_0)
ROWS_SWITCH(q4_k)
ROWS_SWITCH(q6_k)

/* out[r * mc + m] = W[r] . x[m] for nr consecutive rows of W, m < mc <= ROWS_MAX */
static void rows_dot(int qtype, const uint8_t *w, int64_t rb, int64_t nr, const act *x, int mc, int64_t k,
                     float *out) {
    switch (qtype) {
        case QT_Q8_0: q8_0_dispatch(w, rb, nr, x, mc, k / 32, out); return;
        case QT_Q4_0: q4_0_dispatch(w, rb, nr, x, mc, k / 32, out); return;
        case QT_Q5_0: q5_0_dispatch(w, rb, nr, x, mc, k / 32, out); return;
        case QT_Q4_K:
#if defined(MZ_AVX512)
            if (mc == 1) {
                int64_t r = 0;
                for (; r + 4 <= nr; r += 4) q4_k_rows4(w + r * rb, rb, x, k / 256, out + r);
                if (r < nr) q4_k_dispatch(w + r * rb, rb, nr - r, x, 1, k / 256, out + r);
                return;
            }
#endif
            q4_k_dispatch(w, rb, nr, x, mc, k / 256, out);
            return;
        default: q6_k_dispatch(w, rb, nr, x, mc, k / 256, out); return;
    }
}
#else
#define ROWS_MAX 1
static void rows_dot(int qtype, const uint8_t *w, int64_t rb, int64_t nr, const act *x, int mc, int64_t k,
                     float *out) {
    for (int64_t r = 0; r < nr; ++r)
        for (int m = 0; m < mc; ++m) out[r * mc + m] = dot_ref(qtype, w + r * rb, &x[m], k);
}
#endif

/* ------------------------------------------------------------------ driver */

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Quantized activations of one product's x, shared by products with the same x. */
typedef struct {
    const float *x;
    int64_t m, k;
    int bs, layout; /* layout: act_layout */
    uint8_t *base;
    int64_t stride, q_bytes, d_bytes, s_bytes, d8_bytes; /* c8 and c0 take d8_bytes each too, after d8 */
} act_slot;

static inline act act_row(const act_slot *s, int64_t r) {
    const uint8_t *p = s->base + r * s->stride;
    const uint8_t *d8 = p + s->q_bytes + s->d_bytes + s->s_bytes;
    act a = {(const int8_t *)p, (const float *)(p + s->q_bytes), (const int16_t *)(p + s->q_bytes + s->d_bytes),
             s->d8_bytes ? (const float *)d8 : NULL, s->d8_bytes ? (const int32_t *)(d8 + s->d8_bytes) : NULL,
             s->d8_bytes ? (const int32_t *)(d8 + 2 * s->d8_bytes) : NULL};
    return a;
}

#define ALIGN64(v) (((v) + 63) & ~(int64_t)63)

/* Assigns each product an activation slot (returns the count), sizes the buffer. */
static int64_t plan_slots(int64_t count, const mz_product *p, act_slot *slots, int64_t *slot_of, int64_t *bytes) {
    int64_t ns = 0;
    for (int64_t i = 0; i < count; ++i) {
        int bs = act_block(p[i].qtype), layout = act_layout(p[i].qtype);
        int64_t j = 0;
        while (j < ns && !(slots[j].x == p[i].x && slots[j].m == p[i].m && slots[j].k == p[i].k && slots[j].bs == bs &&
                           slots[j].layout == layout))
            ++j;
        if (j == ns) {
            act_slot *s = &slots[ns++];
            s->x = p[i].x, s->m = p[i].m, s->k = p[i].k, s->bs = bs, s->layout = layout;
            s->q_bytes = ALIGN64(s->k);
            s->d_bytes = ALIGN64(4 * (s->k / bs));
            s->s_bytes = ALIGN64(2 * (s->k / 16));
            s->d8_bytes = bs == 32 ? ALIGN64(4 * (s->k / 4)) : 0;
            s->stride = s->q_bytes + s->d_bytes + s->s_bytes + 3 * s->d8_bytes;
            s->base = (uint8_t *)(intptr_t)*bytes; /* offset until the buffer exists */
            *bytes += s->stride * s->m;
        }
        slot_of[i] = j;
    }
    return ns;
}

/* Rows of W per work item: one for few rows of x (fine-grained parallelism), more when x is
 * long, so that a tile of W stays in cache while all of x passes over it. */
static inline int64_t tile_rows(int64_t m) { return m <= MAX_ROWS ? 8 : 16; } /* <= TILE_MAX */

#define TILE_MAX 16

static void run_tile(const mz_product *p, const act_slot *s, int64_t n0) {
    int64_t n1 = n0 + tile_rows(p->m);
    if (n1 > p->n) n1 = p->n;
    int64_t rb = bytes_of(p->qtype) * (p->k / block_of(p->qtype)), nr = n1 - n0;
    act x[ROWS_MAX];
    float a[TILE_MAX * ROWS_MAX], b[TILE_MAX * ROWS_MAX];
    for (int64_t m0 = 0; m0 < p->m; m0 += ROWS_MAX) {
        int mc = (int)(p->m - m0 < ROWS_MAX ? p->m - m0 : ROWS_MAX);
        for (int m = 0; m < mc; ++m) x[m] = act_row(s, m0 + m);
        rows_dot(p->qtype, p->w1 + n0 * rb, rb, nr, x, mc, p->k, a);
        if (p->swiglu) rows_dot(p->qtype, p->w2 + n0 * rb, rb, nr, x, mc, p->k, b);
        for (int m = 0; m < mc; ++m) {
            float *y = p->y + (m0 + m) * p->n + n0;
            for (int64_t r = 0; r < nr; ++r) y[r] = p->swiglu ? silu(a[r * mc + m]) * b[r * mc + m] : a[r * mc + m];
        }
    }
}

static int valid(int64_t count, const mz_product *p) {
    for (int64_t i = 0; i < count; ++i) {
        int bs = block_of(p[i].qtype);
        if (bs == 0 || p[i].m < 1 || p[i].n < 1 || p[i].k < bs || p[i].k % bs) return 0;
    }
    return 1;
}

/* One stage of a call: the products, their distinct activations and where each product's
 * tiles start in the stage's tile numbering. */
typedef struct {
    int64_t count, ns;
    const mz_product *p;
    act_slot *slots;
    const int64_t *slot_of, *tile_start;
} stage;

static int64_t stage_rows(const stage *st) {
    int64_t rows = 0;
    for (int64_t j = 0; j < st->ns; ++j) rows += st->slots[j].m;
    return rows;
}

/* Activation row r of the stage (its slots' rows one after another), quantized. */
static void quantize_item(const stage *st, int64_t r) {
    int64_t j = 0;
    while (r >= st->slots[j].m) r -= st->slots[j++].m;
    const act_slot *s = &st->slots[j];
    uint8_t *base = s->base + r * s->stride;
    quantize_row(s->x + r * s->k, s->k, s->bs, (int8_t *)base, (float *)(base + s->q_bytes),
                 (int16_t *)(base + s->q_bytes + s->d_bytes));
    if (s->layout) swap_middle_groups((int8_t *)base, s->k);
    if (s->d8_bytes) {
        const float *d = (const float *)(base + s->q_bytes);
        float *d8 = (float *)(base + s->q_bytes + s->d_bytes + s->s_bytes);
        for (int64_t b = 0; b < s->k / 32; ++b)
            for (int l = 0; l < 8; ++l) d8[8 * b + l] = d[b];
#if defined(MZ_VNNI512) /* only its Q8_0 loop reads them */
        int32_t *c8 = (int32_t *)((uint8_t *)d8 + s->d8_bytes);
        const int8_t *q = (const int8_t *)base;
        for (int64_t l = 0; l < s->k / 4; ++l) c8[l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
#endif
#if defined(MZ_AVX512) /* only its Q4_0/Q5_0 loops read them */
        int32_t *c0 = (int32_t *)((uint8_t *)d8 + 2 * s->d8_bytes);
        const int16_t *sums = (const int16_t *)(base + s->q_bytes + s->d_bytes);
        for (int64_t b = 0; b < s->k / 32; ++b) {
            c0[8 * b] = -(sums[2 * b] + sums[2 * b + 1]);
            for (int l = 1; l < 8; ++l) c0[8 * b + l] = 0;
        }
#endif
    }
}

/* Tile t of the stage: each tile is computed by one thread in the one order, so results do
 * not depend on which thread ran it. */
static void tile_item(const stage *st, int64_t t) {
    int64_t lo = 0, hi = st->count; /* the product holding tile t: tile_start[lo] <= t < tile_start[lo + 1] */
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (st->tile_start[mid] <= t) lo = mid; else hi = mid;
    }
    run_tile(&st->p[lo], &st->slots[st->slot_of[lo]], (t - st->tile_start[lo]) * tile_rows(st->p[lo].m));
}

/* Phases of a call: quantize stage 1's activations, its tiles, then the same for stage 2. */
static void call_item(void *ctx, int phase, int64_t item) {
    const stage *st = (const stage *)ctx + phase / 2;
    if (phase % 2 == 0) quantize_item(st, item); else tile_item(st, item);
}

#define MAX_PRODUCTS 256

static int64_t weight_bytes(int64_t count, const mz_product *p) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; ++i)
        total += (1 + (p[i].swiglu != 0)) * p[i].n * bytes_of(p[i].qtype) * (p[i].k / block_of(p[i].qtype));
    return total;
}

/* Runs count1 products, then count2 products (which may read the first stage's outputs, e.g.
 * experts' down projections after their gate/up), in one parallel region. 0 on success. */
int megrez_q_products(int64_t count1, const mz_product *p1, int64_t count2, const mz_product *p2) {
    if (count1 < 1 || count1 > MAX_PRODUCTS || count2 < 0 || count2 > MAX_PRODUCTS) return -1;
    if (!valid(count1, p1) || !valid(count2, p2)) return -1;
    act_slot slots1[MAX_PRODUCTS], slots2[MAX_PRODUCTS];
    int64_t slot_of1[MAX_PRODUCTS], slot_of2[MAX_PRODUCTS], start1[MAX_PRODUCTS + 1], start2[MAX_PRODUCTS + 1];
    int64_t bytes = 0;
    int64_t ns1 = plan_slots(count1, p1, slots1, slot_of1, &bytes);
    int64_t ns2 = plan_slots(count2, p2, slots2, slot_of2, &bytes);
    uint8_t *buf = (uint8_t *)aligned_alloc(64, (size_t)ALIGN64(bytes > 0 ? bytes : 64));
    if (buf == NULL) return -2;
    for (int64_t j = 0; j < ns1; ++j) slots1[j].base = buf + (intptr_t)slots1[j].base;
    for (int64_t j = 0; j < ns2; ++j) slots2[j].base = buf + (intptr_t)slots2[j].base;
    start1[0] = start2[0] = 0;
    for (int64_t i = 0; i < count1; ++i)
        start1[i + 1] = start1[i] + (p1[i].n + tile_rows(p1[i].m) - 1) / tile_rows(p1[i].m);
    for (int64_t i = 0; i < count2; ++i)
        start2[i + 1] = start2[i] + (p2[i].n + tile_rows(p2[i].m) - 1) / tile_rows(p2[i].m);
    int threads = mz_threads(weight_bytes(count1, p1) + weight_bytes(count2, p2));
    stage st[2] = {{count1, ns1, p1, slots1, slot_of1, start1}, {count2, ns2, p2, slots2, slot_of2, start2}};
    mz_job job = {count2 ? 4 : 2, {0}, {0}, call_item, st};
    for (int i = 0; i < job.nphases / 2; ++i) {
        int64_t tiles = st[i].tile_start[st[i].count];
        job.items[2 * i] = stage_rows(&st[i]);
        job.chunk[2 * i] = 1;
        /* chunks: few claims, yet a descheduled thread's share is small enough for the others to take */
        job.items[2 * i + 1] = tiles;
        job.chunk[2 * i + 1] = tiles / (16 * threads) + 1;
    }
    mz_run(&job, threads);
    free(buf);
    return 0;
}

/* One token's MoE layer: experts' SwiGLU products on x (stage 1, p1[e]) and their down
 * projections (stage 2, p2[e], each [1, hidden]) as megrez_q_products, then
 * out = (((0 + w_0 y_0) + w_1 y_1) + ...) over the first n_weighted experts, plus the remaining
 * experts' outputs unweighted (the shared experts), one after another: the additions of the
 * batched path (index_add_ over experts in order, then the shared output) in the same order. */
int megrez_q_moe_token(int64_t count, const mz_product *p1, const mz_product *p2, int64_t n_weighted,
                       const float *weights, int64_t hidden, float *out) {
    if (count < 1 || n_weighted < 0 || n_weighted > count) return -1;
    for (int64_t e = 0; e < count; ++e)
        if (p2[e].m != 1 || p2[e].n != hidden) return -1;
    int rc = megrez_q_products(count, p1, count, p2);
    if (rc != 0) return rc;
    for (int64_t d = 0; d < hidden; ++d) out[d] = 0.0f;
    for (int64_t e = 0; e < count; ++e) {
        const float *y = p2[e].y;
        if (e < n_weighted) {
            float w = weights[e];
            for (int64_t d = 0; d < hidden; ++d) out[d] += w * y[d];
        } else {
            for (int64_t d = 0; d < hidden; ++d) out[d] += y[d];
        }
    }
    return 0;
}

/* The scalar reference of one product, for tests: y [m, n] in the reference order. */
int megrez_q_reference(const mz_product *p) {
    if (!valid(1, p)) return -1;
    int bs = act_block(p->qtype);
    int64_t rb = bytes_of(p->qtype) * (p->k / block_of(p->qtype));
    int8_t *q = (int8_t *)malloc((size_t)p->k);
    float *d = (float *)malloc(sizeof(float) * (size_t)(p->k / bs));
    int16_t *s = (int16_t *)malloc(sizeof(int16_t) * (size_t)(p->k / 16));
    if (!q || !d || !s) return free(q), free(d), free(s), -2;
    for (int64_t m = 0; m < p->m; ++m) {
        quantize_row(p->x + m * p->k, p->k, bs, q, d, s);
        act a = {q, d, s, NULL, NULL, NULL};
        for (int64_t n = 0; n < p->n; ++n) {
            float v = dot_ref(p->qtype, p->w1 + n * rb, &a, p->k);
            p->y[m * p->n + n] = p->swiglu ? silu(v) * dot_ref(p->qtype, p->w2 + n * rb, &a, p->k) : v;
        }
    }
    free(q), free(d), free(s);
    return 0;
}

/* The activation quantization itself (tests replicate the products from it): q [m, k],
 * d [m, k / block], s [m, k / 16] for the activation block of qtype. */
int megrez_q_quantize_rows(int qtype, const float *x, int64_t m, int64_t k, int8_t *q, float *d, int16_t *s) {
    int bs = act_block(qtype);
    if (bs == 0 || k % bs) return -1;
    for (int64_t r = 0; r < m; ++r) quantize_row(x + r * k, k, bs, q + r * k, d + r * (k / bs), s + r * (k / 16));
    return 0;
}

/* w [rows, row bytes] -> out [rows, k] float32, exactly ggml's dequantization (same float
 * operations in the same order), rows in parallel. */
int megrez_q_dequantize(int qtype, const uint8_t *w, int64_t rows, int64_t k, float *out) {
    int bs = block_of(qtype);
    if (bs == 0 || k % bs) return -1;
    int64_t nb = k / bs, rb = bytes_of(qtype) * nb;
    /* A decoding step's embedding row alone: an OpenMP region would wake its sleeping threads
     * (tens of microseconds) for a microsecond of work. */
#pragma omp parallel for schedule(static) if (mz_threads(rows * rb) > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *row = w + r * rb;
        float *y = out + r * k;
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t *blk = row + b * bytes_of(qtype);
            float *yb = y + b * bs;
            if (qtype == QT_Q8_0) {
                float d = fp16_to_f32(blk);
                for (int i = 0; i < 32; ++i) yb[i] = (float)((const int8_t *)(blk + 2))[i] * d;
            } else if (qtype == QT_Q4_0) {
                float d = fp16_to_f32(blk);
                for (int i = 0; i < 16; ++i) {
                    yb[i] = d * (float)((blk[2 + i] & 0xf) - 8);
                    yb[i + 16] = d * (float)((blk[2 + i] >> 4) - 8);
                }
            } else if (qtype == QT_Q5_0) {
                float d = fp16_to_f32(blk);
                for (int e = 0; e < 32; ++e) yb[e] = (float)(q5_0_value(blk, e) - 16) * d;
            } else if (qtype == QT_Q4_K) {
                float d = fp16_to_f32(blk), dmin = fp16_to_f32(blk + 2);
                uint8_t sc[8], mn[8];
                q4_k_scales(blk + 4, sc, mn);
                for (int j = 0; j < 8; ++j) {
                    float d1 = d * (float)sc[j], m1 = dmin * (float)mn[j];
                    const uint8_t *qj = blk + 16 + 32 * (j / 2);
                    for (int l = 0; l < 32; ++l) yb[32 * j + l] = d1 * (float)((qj[l] >> ((j & 1) * 4)) & 0xf) - m1;
                }
            } else {
                float d = fp16_to_f32(blk + 208);
                const int8_t *sc = (const int8_t *)(blk + 192);
                for (int e = 0; e < 256; ++e) yb[e] = (d * (float)sc[e / 16]) * (float)(q6_k_value(blk, e) - 32);
            }
        }
    }
    return 0;
}

/* CPU features, for choosing a variant at load: bit 0 avx2+fma+f16c, 1 avx512 f/bw/vl/dq,
 * 2 avx512vnni, 3 avxvnni. (The compiler's runtime check also asks the OS whether it saves
 * the wider registers.) */
int megrez_cpu_features(void) {
    int f = 0;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        f |= 2;
    if (__builtin_cpu_supports("avx512vnni")) f |= 4;
#if defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11
    if (__builtin_cpu_supports("avxvnni")) f |= 8;
#endif
#endif
    return f;
}

/* Which code path this build compiled: 0 scalar, 1 avx2, 2 avx512; +4 with VNNI. */
int megrez_q_variant(void) {
#if defined(MZ_AVX512)
    int v = 2;
#elif defined(MZ_AVX2)
    int v = 1;
#else
    int v = 0;
#endif
#if defined(MZ_VNNI512) || defined(MZ_VNNI256)
    if (v) v += 4;
#endif
    return v;
}
