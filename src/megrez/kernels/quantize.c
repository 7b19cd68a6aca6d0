/* Quantizing float32 weights into ggml's block formats (layouts in quantized.c), bit for bit
 * as ggml's reference quantizers do (ggml-quants.c: quantize_row_q8_0_ref, _q4_0_ref, _q5_0_ref,
 * _q4_K_ref with make_qkx2_quants, _q6_K_ref with make_qx_quants) and as the Python quantizers
 * in megrez/quant/formats.py do (the fallback without a compiler).
 *
 * Exactness rests on IEEE float32 arithmetic in the C order of operations: no fast-math,
 * -ffp-contract=off (no fused multiply-adds), sums in index order. A compiler may vectorise
 * the loops only where that changes no rounding, so every build variant gives the same bytes.
 * Rounding to an integer is ggml's nearest_int (round half to even, |v| < 2^22); fp16 scales
 * are rounded to nearest even; Q8_0 rounds halves away from zero (roundf) as ggml does.
 *
 * The K-quant searches (21 weighted least-squares fits per 32 weights for Q4_K, 19 grids per
 * 16 for Q6_K) dominate. The sub-blocks of a super-block are independent, so they run side by
 * side: lane j of the vectors below is sub-block j, and each lane's sums still add its own
 * elements in index order, so the float operations per sub-block are the reference's while
 * one vector instruction does them for 4 or 8 sub-blocks (about 30x faster than the Python
 * quantizers for Q4_K; docs/quantization.md).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

enum { QZ_Q4_0 = 2, QZ_Q5_0 = 6, QZ_Q8_0 = 8, QZ_Q4_K = 12, QZ_Q6_K = 14 };
#define GROUP_MAX_EPS 1e-15f

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float f32_from(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float32 -> fp16 bits, round to nearest even (ggml's scalar GGML_FP32_TO_FP16). */
static inline uint16_t f32_to_f16(float f) {
    const float scale_to_inf = f32_from(0x77800000u), scale_to_zero = f32_from(0x08800000u);
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u, mantissa_bits = bits & 0x00000FFFu;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : exp_bits + mantissa_bits));
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    return f32_from(bits);
}

static inline void put_f16(uint8_t *p, float f) {
    uint16_t h = f32_to_f16(f);
    memcpy(p, &h, 2);
}

/* ggml's nearest_int: round half to even for |v| < 2^22 (the bit trick vectorises). */
static inline int32_t nearest_int(float v) {
    int32_t i;
    float t = v + 12582912.0f;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* ------------------------------------------------------------------ 32-wide blocks */

static void q8_0_block(const float *x, uint8_t *y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    for (int j = 0; j < 32; ++j) {
        /* roundf (halves away from zero) without a libm call, so the loop vectorises: round to
         * even, then move a half that went down to even up; t - a is exact (|a| <= 127) */
        const float v = x[j] * id, a = fabsf(v);
        float t = (a + 12582912.0f) - 12582912.0f;
        t = t - a == -0.5f ? t + 1.0f : t;
        y[2 + j] = (uint8_t)(int8_t)(int32_t)(v < 0.0f ? -t : t);
    }
}

/* Q4_0 (levels 8, offset 8.5) and Q5_0 (16, 16.5): the weight of largest magnitude (first on
 * ties, sign kept) maps to -levels. Returns 1/d or 0; q[j] the unsigned quants. */
static float signed_block(const float *x, float levels, float offset, int qmax, uint8_t *y, uint8_t q[32]) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    const float d = max / -levels, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    for (int j = 0; j < 32; ++j) {
        int v = (int8_t)(x[j] * id + offset);
        q[j] = (uint8_t)(v < qmax ? v : qmax);
    }
    return id;
}

static void q4_0_block(const float *x, uint8_t *y) {
    uint8_t q[32];
    signed_block(x, 8.0f, 8.5f, 15, y, q);
    for (int j = 0; j < 16; ++j) y[2 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
}

static void q5_0_block(const float *x, uint8_t *y) {
    uint8_t q[32];
    signed_block(x, 16.0f, 16.5f, 31, y, q);
    uint32_t qh = 0;
    for (int j = 0; j < 32; ++j) qh |= (uint32_t)((q[j] & 0x10u) >> 4) << j;
    memcpy(y + 2, &qh, 4);
    for (int j = 0; j < 16; ++j) y[6 + j] = (uint8_t)((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
}

/* ------------------------------------------------------------------ Q4_K */

/* VL float lanes (GCC/clang vector extensions): 8 where the build has AVX (one register), else 4
 * (SSE2, NEON). Every operation is the IEEE float32 operation per lane. */
#if defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
#define VINLINE static inline __attribute__((always_inline))
VINLINE vf splat(float v) { return v - (vf){0}; }
VINLINE vf vselect(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); } /* m ? a : b */
/* nearest_int in float lanes: (v + 1.5 * 2^23) - 1.5 * 2^23 is v rounded to an integer, half to
 * even, exactly for |v| < 2^22 (where nearest_int is defined). */
VINLINE vf vround_even(vf v) { return (v + splat(12582912.0f)) - splat(12582912.0f); }
VINLINE vf vclamp(vf v, vf lo, vf hi) { return vselect(v < lo, lo, vselect(v > hi, hi, v)); }

/* make_qkx2_quants(32, 15, x, weights, L, &the_min, Laux, -1, 0.1, 20, false) on VL sub-blocks
 * at once: lane j of X[i] is element i of sub-block j. */
static void qkx2_lanes(const vf X[32], const vf W[32], vf L[32], vf *scale_out, vf *min_out) {
    const vf zero = splat(0.0f), one = splat(1.0f), nmax = splat(15.0f);
    vf min = X[0], max = X[0], sum_w = W[0], sum_x = W[0] * X[0];
    for (int i = 1; i < 32; ++i) {
        min = vselect(X[i] < min, X[i], min);
        max = vselect(X[i] > max, X[i], max);
        sum_w += W[i];
        sum_x += W[i] * X[i];
    }
    min = vselect(min > zero, zero, min);
    const vi flat = max == min;
    vf iscale = nmax / vselect(flat, one, max - min), scale = one / iscale, best = zero;
    for (int i = 0; i < 32; ++i) {
        vf l = vclamp(vround_even(iscale * (X[i] - min)), zero, nmax);
        L[i] = l;
        vf diff = scale * l + min - X[i];
        best += W[i] * (diff * diff);
    }
    for (int is = 0; is <= 20; ++is) {
        const vf grid = splat(-1.0f + 0.1f * (float)is + 15.0f);
        vf laux[32], sum_l = zero, sum_l2 = zero, sum_xl = zero, err = zero;
        iscale = grid / vselect(flat, one, max - min);
        for (int i = 0; i < 32; ++i) {
            vf l = vclamp(vround_even(iscale * (X[i] - min)), zero, nmax);
            laux[i] = l;
            vf wl = W[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * X[i];
        }
        const vf D = sum_w * sum_l2 - sum_l * sum_l;
        const vi ok = D > zero;
        const vf Ds = vselect(ok, D, one);
        const vf s = (sum_w * sum_xl - sum_x * sum_l) / Ds, m = (sum_l2 * sum_x - sum_l * sum_xl) / Ds;
        const vi pos = m > zero;
        const vf this_min = vselect(pos, zero, m);
        const vf this_scale = vselect(pos, sum_xl / vselect(sum_l2 > zero, sum_l2, one), s);
        for (int i = 0; i < 32; ++i) {
            vf diff = this_scale * laux[i] + this_min - X[i];
            err += W[i] * (diff * diff);
        }
        const vi take = ~flat & ok & (err < best);
        best = vselect(take, err, best);
        scale = vselect(take, this_scale, scale);
        min = vselect(take, this_min, min);
        for (int i = 0; i < 32; ++i) L[i] = vselect(take, laux[i], L[i]);
    }
    *scale_out = vselect(flat, zero, scale);
    *min_out = -min; /* a flat sub-block keeps its first min (clamped to 0) */
    for (int i = 0; i < 32; ++i) L[i] = vselect(flat, zero, L[i]);
}

static void q4_k_block(const float *x, uint8_t *y) {
    float scales[8], mins[8], L[8][32];
    for (int g = 0; g < 8 / VL; ++g) {
        vf X[32], W[32], Lv[32], sv, mv;
        for (int j = 0; j < VL; ++j) {
            const float *xj = x + 32 * (g * VL + j);
            float sum_x2 = 0.0f;
            for (int i = 0; i < 32; ++i) sum_x2 += xj[i] * xj[i];
            const float av_x = sqrtf(sum_x2 / 32.0f);
            for (int i = 0; i < 32; ++i) {
                X[i][j] = xj[i];
                W[i][j] = av_x + fabsf(xj[i]);
            }
        }
        qkx2_lanes(X, W, Lv, &sv, &mv);
        for (int j = 0; j < VL; ++j) {
            scales[g * VL + j] = sv[j];
            mins[g * VL + j] = mv[j];
            for (int i = 0; i < 32; ++i) L[g * VL + j][i] = Lv[i][j];
        }
    }
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    uint8_t *s12 = y + 4, ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
        uint8_t a = (uint8_t)nearest_int(inv_scale * scales[j]), b = (uint8_t)nearest_int(inv_min * mins[j]);
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
    }
    for (int j = 0; j < 4; ++j) {
        s12[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        s12[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        s12[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    const uint16_t dh = f32_to_f16(max_scale / 63.0f), dmh = f32_to_f16(max_min / 63.0f);
    memcpy(y, &dh, 2);
    memcpy(y + 2, &dmh, 2);
    const float dd = f16_to_f32(dh), dmin = f16_to_f32(dmh);
    uint8_t q[256];
    for (int j = 0; j < 8; ++j) {
        const float d = dd * (float)ls[j];
        if (d == 0.0f) { /* ggml keeps the search's quants */
            for (int i = 0; i < 32; ++i) q[32 * j + i] = (uint8_t)L[j][i];
            continue;
        }
        const float dm = dmin * (float)lm[j];
        for (int i = 0; i < 32; ++i) {
            int32_t l = nearest_int((x[32 * j + i] + dm) / d);
            q[32 * j + i] = (uint8_t)(l < 0 ? 0 : (l > 15 ? 15 : l));
        }
    }
    uint8_t *qs = y + 16;
    for (int j = 0; j < 256; j += 64) {
        for (int l = 0; l < 32; ++l) qs[l] = (uint8_t)(q[j + l] | (q[j + l + 32] << 4));
        qs += 32;
    }
}

/* ------------------------------------------------------------------ Q6_K */

/* make_qx_quants(16, 32, x, L, rmse_type 1, NULL) on VL sub-blocks at once: lane j of X[i] is
 * element i of sub-block j; L in 0..63. */
static void qx_lanes(const vf X[16], vf L[16], vf *scale_out) {
    const vf zero = splat(0.0f), one = splat(1.0f), nmax = splat(32.0f), top = splat(31.0f), bottom = -nmax;
    vf amax = zero, max = zero;
    for (int i = 0; i < 16; ++i) {
        const vf ax = vselect(X[i] < zero, -X[i], X[i]);
        const vi more = ax > amax;
        amax = vselect(more, ax, amax);
        max = vselect(more, X[i], max);
    }
    const vi tiny = amax < splat(GROUP_MAX_EPS);
    const vf maxs = vselect(tiny, one, max);
    vf iscale = -nmax / maxs, sumlx = zero, suml2 = zero;
    for (int i = 0; i < 16; ++i) {
        const vf x = X[i], l = vclamp(vround_even(iscale * x), bottom, top), w = x * x;
        L[i] = l + nmax;
        sumlx += w * x * l;
        suml2 += w * l * l;
    }
    vf scale = vselect(suml2 != zero, sumlx / vselect(suml2 != zero, suml2, one), zero);
    vf best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        vf laux[16];
        iscale = splat(-(32.0f + 0.1f * (float)is)) / maxs;
        sumlx = suml2 = zero;
        for (int i = 0; i < 16; ++i) {
            const vf x = X[i], l = vclamp(vround_even(iscale * x), bottom, top), w = x * x;
            laux[i] = l + nmax;
            sumlx += w * x * l;
            suml2 += w * l * l;
        }
        const vi take = (suml2 > zero) & (sumlx * sumlx > best * suml2);
        scale = vselect(take, sumlx / vselect(take, suml2, one), scale);
        best = vselect(take, scale * sumlx, best);
        for (int i = 0; i < 16; ++i) L[i] = vselect(take, laux[i], L[i]);
    }
    *scale_out = vselect(tiny, zero, scale); /* all (nearly) zero: L = 0, scale 0 */
    for (int i = 0; i < 16; ++i) L[i] = vselect(tiny, zero, L[i]);
}

static void q6_k_block(const float *x, uint8_t *y) {
    float scales[16], L[16][16];
    for (int g = 0; g < 16 / VL; ++g) {
        vf X[16], Lv[16], sv;
        for (int j = 0; j < VL; ++j)
            for (int i = 0; i < 16; ++i) X[i][j] = x[16 * (g * VL + j) + i];
        qx_lanes(X, Lv, &sv);
        for (int j = 0; j < VL; ++j) {
            scales[g * VL + j] = sv[j];
            for (int i = 0; i < 16; ++i) L[g * VL + j][i] = Lv[i][j];
        }
    }
    float max_scale = 0.0f, max_abs = 0.0f;
    for (int j = 0; j < 16; ++j) {
        float a = fabsf(scales[j]);
        if (a > max_abs) {
            max_abs = a;
            max_scale = scales[j];
        }
    }
    if (max_abs < GROUP_MAX_EPS) {
        memset(y, 0, 210);
        return;
    }
    const float iscale = -128.0f / max_scale;
    const uint16_t dh = f32_to_f16(1.0f / iscale);
    int8_t sc[16];
    for (int j = 0; j < 16; ++j) {
        int32_t v = nearest_int(iscale * scales[j]);
        sc[j] = (int8_t)(v < 127 ? v : 127);
    }
    const float dd = f16_to_f32(dh);
    uint8_t q[256];
    for (int j = 0; j < 16; ++j) {
        const float d = dd * (float)sc[j];
        if (d == 0.0f) { /* ggml keeps the search's quants */
            for (int i = 0; i < 16; ++i) q[16 * j + i] = (uint8_t)L[j][i];
            continue;
        }
        for (int i = 0; i < 16; ++i) {
            int32_t l = nearest_int(x[16 * j + i] / d);
            l = l < -32 ? -32 : (l > 31 ? 31 : l);
            q[16 * j + i] = (uint8_t)(l + 32);
        }
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int j = 0; j < 256; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t *a = q + j + l;
            ql[l] = (uint8_t)((a[0] & 0xF) | ((a[64] & 0xF) << 4));
            ql[l + 32] = (uint8_t)((a[32] & 0xF) | ((a[96] & 0xF) << 4));
            qh[l] = (uint8_t)((a[0] >> 4) | ((a[32] >> 4) << 2) | ((a[64] >> 4) << 4) | ((a[96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
    memcpy(y + 192, sc, 16);
    memcpy(y + 208, &dh, 2);
}

/* ------------------------------------------------------------------ entry point */

/* x [rows, k] float32 -> out [rows, row bytes] (rows are whole blocks, so the blocks simply
 * follow each other), blocks in parallel. 0 on success, -1 for an unknown type or a k that is
 * not a multiple of the block. */
int megrez_quantize(int qtype, const float *x, int64_t rows, int64_t k, uint8_t *out) {
    int bs, nbytes;
    void (*fn)(const float *, uint8_t *);
    switch (qtype) {
        case QZ_Q8_0: bs = 32, nbytes = 34, fn = q8_0_block; break;
        case QZ_Q4_0: bs = 32, nbytes = 18, fn = q4_0_block; break;
        case QZ_Q5_0: bs = 32, nbytes = 22, fn = q5_0_block; break;
        case QZ_Q4_K: bs = 256, nbytes = 144, fn = q4_k_block; break;
        case QZ_Q6_K: bs = 256, nbytes = 210, fn = q6_k_block; break;
        default: return -1;
    }
    if (rows < 0 || k <= 0 || k % bs) return -1;
    const int64_t nb = rows * (k / bs);
    const int64_t chunk = bs == 256 ? 16 : 512; /* blocks per task */
    const int parallel = nb * bs >= (bs == 256 ? 1 << 14 : 1 << 18);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t c = 0; c < (nb + chunk - 1) / chunk; ++c) {
        const int64_t end = (c + 1) * chunk < nb ? (c + 1) * chunk : nb;
        for (int64_t b = c * chunk; b < end; ++b) fn(x + b * bs, out + b * nbytes);
    }
    return 0;
}
