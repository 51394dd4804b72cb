/* N:M sparse x dense on the CPU (sparsetx issue: fast CPU kernels).
 *
 * y^T (O x T) = W (O x K, N:M) x^T (K x T), with W given row by row as its kept values and their
 * absolute input indices (kernel layout: vals[o * kn + j], idx[o * kn + j], kn = K / M * N).
 * Activations are token-contiguous (x^T), so each kept weight is one broadcast and an FMA over a
 * tile of tokens: STA's "select the operand by its index", done by an address instead of a mux.
 * Dense x dense runs through the same code with N = M (every index present).
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TILE 32 /* tokens per register tile: 4 vectors of 8 floats */

static void row_tile(const float *xT, int T, const float *v, const int32_t *ix, int kn,
                     float b, float *out, int t0, int nt) {
#ifdef __AVX2__
    if (nt == TILE) {
        __m256 a0 = _mm256_set1_ps(b), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < kn; j++) {
            const float *p = xT + (int64_t)ix[j] * T + t0;
            __m256 w = _mm256_set1_ps(v[j]);
            a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p), a0);
            a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 8), a1);
            a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 16), a2);
            a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 24), a3);
        }
        _mm256_storeu_ps(out + t0, a0);
        _mm256_storeu_ps(out + t0 + 8, a1);
        _mm256_storeu_ps(out + t0 + 16, a2);
        _mm256_storeu_ps(out + t0 + 24, a3);
        return;
    }
#endif
    float acc[TILE];
    for (int t = 0; t < nt; t++) acc[t] = b;
    for (int j = 0; j < kn; j++) {
        const float *p = xT + (int64_t)ix[j] * T + t0;
        float w = v[j];
        for (int t = 0; t < nt; t++) acc[t] += w * p[t];
    }
    memcpy(out + t0, acc, sizeof(float) * nt);
}

/* Many tokens: yT[o, t] for every output row o and token t. */
void nm_linear_tokens(const float *xT, int T, const float *vals, const int32_t *idx, int O, int kn,
                      const float *bias, float *yT, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int o = 0; o < O; o++) {
        const float *v = vals + (int64_t)o * kn;
        const int32_t *ix = idx + (int64_t)o * kn;
        float b = bias ? bias[o] : 0.0f;
        for (int t0 = 0; t0 < T; t0 += TILE) {
            int nt = T - t0 < TILE ? T - t0 : TILE;
            row_tile(xT, T, v, ix, kn, b, yT + (int64_t)o * T, t0, nt);
        }
    }
}

/* One token (decoding): y[o] = sum_j vals[o, j] * x[idx[o, j]], 8 kept weights per gather. */
void nm_linear_vector(const float *x, const float *vals, const int32_t *idx, int O, int kn,
                      const float *bias, float *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int o = 0; o < O; o++) {
        const float *v = vals + (int64_t)o * kn;
        const int32_t *ix = idx + (int64_t)o * kn;
        int j = 0;
        float s = 0.0f;
#ifdef __AVX2__
        __m256 acc = _mm256_setzero_ps();
        for (; j + 8 <= kn; j += 8) {
            __m256i i8 = _mm256_loadu_si256((const __m256i *)(ix + j));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), _mm256_i32gather_ps(x, i8, 4), acc);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        for (int l = 0; l < 8; l++) s += lanes[l];
#endif
        for (; j < kn; j++) s += v[j] * x[ix[j]];
        y[o] = s + (bias ? bias[o] : 0.0f);
    }
}
