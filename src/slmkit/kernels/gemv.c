/* Batch-1 (few-row) matrix-vector products for CPU decode, written for memory bandwidth.
 *
 * y[m, o] = sum_i x[m, i] * W[o, i]   for m < M (M small: decode is M = 1), W row-major [out, in].
 * Each weight row is read once for all M inputs; rows are split across OpenMP threads. Plain C that gcc
 * vectorises at -O3 -march=native; no intrinsics, so it builds on any CPU gcc targets.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Dot products accumulate into LANES independent partial sums so that consecutive fused multiply-adds do
 * not wait on each other. Input rows go four at a time: each weight element is loaded (and, for bf16,
 * converted) once for four products, so a few-row product (continuous batching, speculative verification)
 * costs little more than one row. A row's arithmetic is the same alone or in a group of four (the same LANES
 * partial sums, summed in the same order), so results do not depend on how rows are grouped. 16 lanes with
 * four-row groups measured fastest here (gcc -O3 -march=native; 64 lanes spilled registers in the groups). */
#define LANES 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float f32_id(float v) { return v; }

/* y[o], y[out + o], ... for one weight row w and the rows x0.. (ROWS of them, 1 or 4) */
#define ROWS_KERNEL(NAME, WT, LOAD)                                                                          \
    static inline void NAME##_1(const WT *w, const float *x0, float *y, int64_t in) {                         \
        float a0[LANES] = {0};                                                                               \
        int64_t i = 0;                                                                                       \
        for (; i + LANES <= in; i += LANES)                                                                  \
            for (int j = 0; j < LANES; j++) a0[j] += LOAD(w[i + j]) * x0[i + j];                             \
        float s0 = 0.0f;                                                                                     \
        for (; i < in; i++) s0 += LOAD(w[i]) * x0[i];                                                        \
        for (int j = 0; j < LANES; j++) s0 += a0[j];                                                         \
        y[0] = s0;                                                                                           \
    }                                                                                                        \
    static inline void NAME##_4(const WT *w, const float *x0, float *y, int64_t in, int64_t out) {            \
        const float *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;                                             \
        float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};                            \
        int64_t i = 0;                                                                                       \
        for (; i + LANES <= in; i += LANES)                                                                  \
            for (int j = 0; j < LANES; j++) {                                                                \
                float wv = LOAD(w[i + j]);                                                                   \
                a0[j] += wv * x0[i + j], a1[j] += wv * x1[i + j], a2[j] += wv * x2[i + j], a3[j] += wv * x3[i + j]; \
            }                                                                                                \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                                    \
        for (; i < in; i++) {                                                                                \
            float wv = LOAD(w[i]);                                                                           \
            s0 += wv * x0[i], s1 += wv * x1[i], s2 += wv * x2[i], s3 += wv * x3[i];                          \
        }                                                                                                    \
        for (int j = 0; j < LANES; j++) s0 += a0[j], s1 += a1[j], s2 += a2[j], s3 += a3[j];                  \
        y[0] = s0, y[out] = s1, y[2 * out] = s2, y[3 * out] = s3;                                            \
    }

ROWS_KERNEL(rows_f32, float, f32_id)
ROWS_KERNEL(rows_bf16, uint16_t, bf16_to_f32)

/* Eight rows at once: two groups of four sharing each weight load (the same per-row arithmetic). */
#define ROWS8_KERNEL(NAME, WT, LOAD)                                                                         \
    static inline void NAME##_8(const WT *w, const float *x0, float *y, int64_t in, int64_t out) {            \
        const float *x4 = x0 + 4 * in;                                                                       \
        float a[8][LANES] = {{0}};                                                                           \
        int64_t i = 0;                                                                                       \
        for (; i + LANES <= in; i += LANES)                                                                  \
            for (int j = 0; j < LANES; j++) {                                                                \
                float wv = LOAD(w[i + j]);                                                                   \
                a[0][j] += wv * x0[i + j], a[1][j] += wv * x0[in + i + j];                                   \
                a[2][j] += wv * x0[2 * in + i + j], a[3][j] += wv * x0[3 * in + i + j];                      \
                a[4][j] += wv * x4[i + j], a[5][j] += wv * x4[in + i + j];                                   \
                a[6][j] += wv * x4[2 * in + i + j], a[7][j] += wv * x4[3 * in + i + j];                      \
            }                                                                                                \
        for (int r = 0; r < 8; r++) {                                                                        \
            float s = 0.0f;                                                                                  \
            for (int64_t t = i; t < in; t++) s += LOAD(w[t]) * x0[r * in + t];                               \
            for (int j = 0; j < LANES; j++) s += a[r][j];                                                    \
            y[r * out] = s;                                                                                  \
        }                                                                                                    \
    }

ROWS8_KERNEL(rows_f32, float, f32_id)
ROWS8_KERNEL(rows_bf16, uint16_t, bf16_to_f32)

void gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t out, int64_t in, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) rows_f32_8(W + o * in, x + m * in, y + m * out + o, in, out);
        for (; m + 4 <= M; m += 4) rows_f32_4(W + o * in, x + m * in, y + m * out + o, in, out);
        for (; m < M; m++) rows_f32_1(W + o * in, x + m * in, y + m * out + o, in);
    }
}

void gemv_bf16(const uint16_t *W, const float *x, float *y, int64_t M, int64_t out, int64_t in, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) rows_bf16_8(W + o * in, x + m * in, y + m * out + o, in, out);
        for (; m + 4 <= M; m += 4) rows_bf16_4(W + o * in, x + m * in, y + m * out + o, in, out);
        for (; m < M; m++) rows_bf16_1(W + o * in, x + m * in, y + m * out + o, in);
    }
}

/* ---- packed low-bit weights (slmkit.quant.packed) ---------------------------------------------------------
 *
 * Q [out, in / per_byte] uint8 codes (8-bit: one per byte; 4-bit: column 2j in the low nibble of byte j, 2j+1 in
 * the high nibble), float16 scales (and offsets, asymmetric) [out, in / group]. Group g of a row covers input
 * columns [g * group, (g + 1) * group):
 *
 *   symmetric   w = scale * (q - mid)       mid = 2^(bits - 1)     (offsets == NULL)
 *   asymmetric  w = scale * q + offset
 *
 * so a row's product is sum_g scale_g * sum_{i in g} (q_i - mid) x_i  [+ sum_g offset_g * sum_{i in g} x_i].
 * The codes are centred in integers (exact), so the symmetric sum does not cancel a large mid * sum(x) term.
 * A code costs 1/4 (8-bit) or 1/8 (4-bit) of the bytes of an fp32 weight, but widening it to a float costs
 * several vector instructions: on a small machine these products are compute-bound, at roughly 1.3-1.6x the
 * weights per second of gemv_f32 per core (see benchmarks/README.md, quant_decode.py). */

/* Partial sums per row = bytes of codes per vector step (16 columns at 8 bits, 32 at 4). 16 measured best on
 * a Zen 1 guest (gcc prefers 128-bit vectors there); 32 spills registers, 8 leaves the FMA units idle. */
#define Q_LANES 16

static inline float f16_to_f32(uint16_t h) {
#ifdef __FLT16_MAX__
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
#else /* IEEE half -> single by hand: normal, subnormal, zero, inf / nan */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f)
        bits = sign | 0x7f800000u | man << 13;
    else if (exp != 0)
        bits = sign | (exp + 112) << 23 | man << 13;
    else if (man == 0)
        bits = sign;
    else {
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | exp << 23 | (man & 0x3ff) << 13;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

typedef float f32x4 __attribute__((vector_size(16))); /* gcc / clang vector extension, not an intrinsic */

/* One row of 8-bit codes against x: sum_g scale_g * sum_{i in g} (q_i - mid) x_i. Each group's sum runs in
 * Q_LANES unscaled partial sums, scaled once at the group's end into accumulators typed as vectors (as plain
 * float arrays, gcc 12 moves them through scalar registers there, which made this form slower than scaling
 * every product). */
__attribute__((noinline)) static float dot_q8(const uint8_t *q, const float *x, const uint16_t *scales,
                                              int64_t groups, int64_t group, int mid) {
    f32x4 acc[Q_LANES / 4] = {{0}};
    float sum = 0.0f;
    for (int64_t g = 0; g < groups; g++, q += group, x += group) {
        float part[Q_LANES] = {0}, rest = 0.0f;
        int64_t i = 0;
        for (; i + Q_LANES <= group; i += Q_LANES)
            for (int j = 0; j < Q_LANES; j++) part[j] += (float)(q[i + j] - mid) * x[i + j];
        for (; i < group; i++) rest += (float)(q[i] - mid) * x[i];
        const float s = f16_to_f32(scales[g]);
        f32x4 p[Q_LANES / 4];
        memcpy(p, part, sizeof p);
        for (int k = 0; k < Q_LANES / 4; k++) acc[k] += s * p[k];
        sum += s * rest;
    }
    for (int k = 1; k < Q_LANES / 4; k++) acc[0] += acc[k];
    return sum + (acc[0][0] + acc[0][1]) + (acc[0][2] + acc[0][3]);
}

/* The same for 4-bit codes, `half` = group / 2 bytes per group: byte i holds column 2i (low nibble, against
 * xe[i]) and column 2i + 1 (high nibble, against xo[i]). Here scaling every product measured faster. */
__attribute__((noinline)) static float dot_q4(const uint8_t *q, const float *xe, const float *xo,
                                              const uint16_t *scales, int64_t groups, int64_t half, int mid) {
    float acc[Q_LANES] = {0}, sum = 0.0f;
    for (int64_t g = 0; g < groups; g++, q += half, xe += half, xo += half) {
        const float s = f16_to_f32(scales[g]);
        int64_t i = 0;
        for (; i + Q_LANES <= half; i += Q_LANES)
            for (int j = 0; j < Q_LANES; j++)
                acc[j] += s * ((float)((q[i + j] & 15) - mid) * xe[i + j] + (float)((q[i + j] >> 4) - mid) * xo[i + j]);
        for (; i < half; i++)
            sum += s * ((float)((q[i] & 15) - mid) * xe[i] + (float)((q[i] >> 4) - mid) * xo[i]);
    }
    for (int j = 0; j < Q_LANES; j++) sum += acc[j];
    return sum;
}

/* sum_g offset_g * sums[g]: the asymmetric grid's offsets times each group's sum of x. */
static float offset_term(const uint16_t *offsets, const float *sums, int64_t groups) {
    float sum = 0.0f;
    for (int64_t g = 0; g < groups; g++) sum += f16_to_f32(offsets[g]) * sums[g];
    return sum;
}

/* Per-call preparation shared by every row: for 4 bits, each x row split into even and odd columns
 * (xs [M, 2, in / 2]); for asymmetric grids, the sum of x over each group (sums [M, groups]). */
static void prepare_x(const float *x, float *xs, float *sums, int64_t M, int64_t in, int64_t group, int split) {
    const int64_t groups = in / group, half = in / 2;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * in;
        if (split)
            for (int64_t j = 0; j < half; j++) {
                xs[m * in + j] = xm[2 * j];
                xs[m * in + half + j] = xm[2 * j + 1];
            }
        if (sums)
            for (int64_t g = 0; g < groups; g++) {
                float s = 0.0f;
                for (int64_t i = 0; i < group; i++) s += xm[g * group + i];
                sums[m * groups + g] = s;
            }
    }
}

/* y[m, o] = sum_i x[m, i] * W[o, i] for W packed as above, bits 8 or 4 (group even for 4 bits). Returns 0, or
 * -1 when its scratch memory could not be allocated (y is then untouched). */
int gemv_packed(int bits, const uint8_t *Q, const uint16_t *scales, const uint16_t *offsets, const float *x,
                float *y, int64_t M, int64_t out, int64_t in, int64_t group, int threads) {
    const int64_t groups = in / group, row_bytes = bits == 4 ? in / 2 : in;
    const int mid = offsets ? 0 : 1 << (bits - 1);
    float *xs = bits == 4 ? malloc(sizeof(float) * M * in) : NULL;
    float *sums = offsets ? malloc(sizeof(float) * M * groups) : NULL;
    if ((bits == 4 && !xs) || (offsets && !sums)) {
        free(xs);
        free(sums);
        return -1;
    }
    prepare_x(x, xs, sums, M, in, group, bits == 4);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *q = Q + o * row_bytes;
        for (int64_t m = 0; m < M; m++) {
            float sum = bits == 4
                ? dot_q4(q, xs + m * in, xs + m * in + in / 2, scales + o * groups, groups, group / 2, mid)
                : dot_q8(q, x + m * in, scales + o * groups, groups, group, mid);
            if (offsets) sum += offset_term(offsets + o * groups, sums + m * groups, groups);
            y[m * out + o] = sum;
        }
    }
    free(xs);
    free(sums);
    return 0;
}

/* W[o, i] = scale * (q - mid) (symmetric) or scale * q + offset (asymmetric), float32 [out, in], for the packed
 * layouts above (8 or 4 bits). The operations are torch's (scheme.dequantize), unfused, so the matrix is the
 * same bit for bit: prefill and scoring multiply it with torch's GEMM. */
__attribute__((optimize("fp-contract=off")))
void dequant_packed(int bits, const uint8_t *Q, const uint16_t *scales, const uint16_t *offsets, float *W,
                    int64_t out, int64_t in, int64_t group, int threads) {
    const int64_t groups = in / group, row_bytes = bits == 4 ? in / 2 : in;
    const int mid = offsets ? 0 : 1 << (bits - 1);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *q = Q + o * row_bytes;
        float *w = W + o * in;
        for (int64_t g = 0; g < groups; g++) {
            const float s = f16_to_f32(scales[o * groups + g]);
            const float b = offsets ? f16_to_f32(offsets[o * groups + g]) : 0.0f;
            float *wg = w + g * group;
            if (bits == 4) {
                const uint8_t *qg = q + g * group / 2;
                for (int64_t i = 0; i < group / 2; i++) {
                    wg[2 * i] = s * (float)((qg[i] & 15) - mid) + b;
                    wg[2 * i + 1] = s * (float)((qg[i] >> 4) - mid) + b;
                }
            } else {
                const uint8_t *qg = q + g * group;
                for (int64_t i = 0; i < group; i++) wg[i] = s * (float)(qg[i] - mid) + b;
            }
        }
    }
}
