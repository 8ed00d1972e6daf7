/* Batch-1 (few-row) matrix-vector products for CPU decode, written for memory bandwidth.
 *
 * y[m, o] = sum_i x[m, i] * W[o, i]   for m < M (M small: decode is M = 1), W row-major [out, in].
 * Each weight row is read once for all M inputs; rows are split across OpenMP threads. Plain C that gcc
 * vectorises at -O3 -march=native; no intrinsics, so it builds on any CPU gcc targets.
 */
#include <stdint.h>
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
