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
 * not wait on each other (one vector accumulator is latency-bound at about half the memory bandwidth). */
#define LANES 64

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t out, int64_t in, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        const float *w = W + o * in;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * in;
            float acc[LANES] = {0};
            int64_t i = 0;
            for (; i + LANES <= in; i += LANES)
                for (int j = 0; j < LANES; j++) acc[j] += w[i + j] * xm[i + j];
            float sum = 0.0f;
            for (; i < in; i++) sum += w[i] * xm[i];
            for (int j = 0; j < LANES; j++) sum += acc[j];
            y[m * out + o] = sum;
        }
    }
}

void gemv_bf16(const uint16_t *W, const float *x, float *y, int64_t M, int64_t out, int64_t in, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < out; o++) {
        const uint16_t *w = W + o * in;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * in;
            float acc[LANES] = {0};
            int64_t i = 0;
            for (; i + LANES <= in; i += LANES)
                for (int j = 0; j < LANES; j++) acc[j] += bf16_to_f32(w[i + j]) * xm[i + j];
            float sum = 0.0f;
            for (; i < in; i++) sum += bf16_to_f32(w[i]) * xm[i];
            for (int j = 0; j < LANES; j++) sum += acc[j];
            y[m * out + o] = sum;
        }
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
