/* N:M sparse x dense on the CPU (sparsetx issue: fast CPU kernels).
 *
 * y (T x O) = x (T x K) W^T, W (O x K) N:M along K. Two weight layouts, both made once per weight by
 * sparsetx/kernels/nm_linear.py in the order the kernels read them:
 *
 * 1. Pair layout (many tokens). Rows in pairs (O padded to even with zero rows); K in blocks of
 *    KB = floor(256 / M) * M columns, so every row keeps exactly KB / M * N weights per block.
 *    For pair p, block b, kept slot j, row r in {0, 1}:
 *        vals[p * 2 * kn + 2 * (b * KB / M * N) + 2 * j + r]  (fp32)
 *        idx [same]                                          (uint16, (column - b * KB) * 32)
 *    kn = K / M * N. Each thread copies a tile of TW tokens x KB columns of x into a column-major
 *    tile (TW floats per column, 32 KiB for TW = 32), so a kept weight is one broadcast and TW / 8
 *    FMAs over contiguous tokens: STA's "select the operand by its index", done by an address.
 *    2 rows x 4 vectors (TW = 32) or 4 rows x 2 vectors (TW = 16) or 8 rows x 1 vector (TW = 8)
 *    keep 8 independent FMA chains in flight.
 *
 * 2. Lane layout (one token, decoding). Rows in octets (O padded to a multiple of 8); octet q,
 *    group g, slot s: 8 values (one per row) and 8 in-group positions (uint8):
 *        lvals[((q * G + g) * N + s) * 8 + lane], lpos[same], G = K / M.
 *    The M inputs of group g sit in one or two registers; vpermps picks each row's input by its
 *    position: no memory gather. STA's operand multiplexer, in-register. M > 16 uses a gather.
 *
 * Dense x dense runs through the same code with N = M.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAXTW 32

/* x rows t0..t0+nt, columns c0..c0+nc -> tile[c * TW + t], tokens nt..TW zero. */
static void pack_tile(const float *x, int64_t ldx, int t0, int nt, int c0, int nc, int TW, float *tile) {
    if (nt < TW) memset(tile, 0, sizeof(float) * (size_t)nc * TW);
    for (int t = 0; t < nt; t++) {
        const float *src = x + (int64_t)(t0 + t) * ldx + c0;
        for (int c = 0; c < nc; c++) tile[c * TW + t] = src[c];
    }
}

/* Accumulate R rows (R / 2 consecutive pairs) x NV vectors over one K block: acc[r][v] kept in
 * registers by the constant bounds after inlining. part holds each row's TW partial sums. */
static inline __attribute__((always_inline)) void block_rows(
    const float *tile, const float *v, const uint16_t *ix, int64_t pair_stride, int kbn,
    float *part, const int R, const int NV) {
    const int TW = NV * 8, SHIFT = NV == 4 ? 0 : (NV == 2 ? 1 : 2);  /* idx holds column * 32 */
#ifdef __AVX2__
    __m256 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < NV; u++) acc[r][u] = _mm256_loadu_ps(part + r * TW + u * 8);
    for (int j = 0; j < kbn; j++) {
        for (int r = 0; r < R; r++) {
            int64_t o = (r >> 1) * pair_stride + 2 * j + (r & 1);
            const float *p = tile + ((size_t)ix[o] >> SHIFT);
            __m256 w = _mm256_broadcast_ss(v + o);
            for (int u = 0; u < NV; u++) acc[r][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + u * 8), acc[r][u]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < NV; u++) _mm256_storeu_ps(part + r * TW + u * 8, acc[r][u]);
#else
    for (int j = 0; j < kbn; j++)
        for (int r = 0; r < R; r++) {
            int64_t o = (r >> 1) * pair_stride + 2 * j + (r & 1);
            const float *p = tile + ((size_t)ix[o] >> SHIFT);
            float w = v[o];
            for (int t = 0; t < TW; t++) part[r * TW + t] += w * p[t];
        }
#endif
}

/* Many tokens. x: T rows of K floats, row stride ldx. y: T x O (row stride O). Op2 = padded rows. */
void nm_linear_tokens(const float *x, int64_t ldx, int T, int K, const float *vals, const uint16_t *idx,
                      int O, int kn, int N, int M, int KB, const float *bias, float *y, int threads) {
    const int P = (O + 1) / 2;                      /* row pairs */
    const int TW = T > 16 ? 32 : (T > 8 ? 16 : 8);  /* tokens per tile */
    const int NV = TW / 8, R = 8 / NV;              /* rows per step: 8 FMA chains */
    const int64_t ps = 2 * (int64_t)kn;             /* floats per pair */
    #pragma omp parallel num_threads(threads)
    {
        int nth = 1, me = 0;
#ifdef _OPENMP
        nth = omp_get_num_threads(); me = omp_get_thread_num();
#endif
        /* this thread's pairs, in whole steps of R / 2 pairs */
        int steps = (P + R / 2 - 1) / (R / 2);
        int s0 = (int)((int64_t)steps * me / nth), s1 = (int)((int64_t)steps * (me + 1) / nth);
        int p0 = s0 * (R / 2), p1 = s1 * (R / 2) < P ? s1 * (R / 2) : P;
        float *tile = aligned_alloc(64, sizeof(float) * (size_t)KB * MAXTW);
        float *part = aligned_alloc(64, sizeof(float) * (size_t)(p1 - p0 + R) * 2 * MAXTW + 64);
        for (int t0 = 0; t0 < T && p0 < p1; t0 += TW) {
            int nt = T - t0 < TW ? T - t0 : TW;
            for (int p = p0; p < p1; p++)
                for (int r = 0; r < 2; r++) {
                    int o = 2 * p + r;
                    float b = (bias && o < O) ? bias[o] : 0.0f;
                    for (int t = 0; t < TW; t++) part[((p - p0) * 2 + r) * TW + t] = b;
                }
            for (int c0 = 0, jb = 0; c0 < K; c0 += KB) {
                int nc = K - c0 < KB ? K - c0 : KB;
                int kbn = nc / M * N;
                pack_tile(x, ldx, t0, nt, c0, nc, TW, tile);
                for (int p = p0; p < p1; p += R / 2) {
                    const float *v = vals + p * ps + 2 * jb;
                    const uint16_t *ix = idx + p * ps + 2 * jb;
                    float *pp = part + (p - p0) * 2 * TW;
                    if (p + R / 2 <= p1) {
                        if (NV == 4) block_rows(tile, v, ix, ps, kbn, pp, 2, 4);
                        else if (NV == 2) block_rows(tile, v, ix, ps, kbn, pp, 4, 2);
                        else block_rows(tile, v, ix, ps, kbn, pp, 8, 1);
                    } else {  /* the last pairs of this thread, one at a time */
                        for (int q = 0; q < p1 - p; q++) {
                            if (NV == 4) block_rows(tile, v + q * ps, ix + q * ps, ps, kbn, pp + q * 2 * TW, 2, 4);
                            else if (NV == 2) block_rows(tile, v + q * ps, ix + q * ps, ps, kbn, pp + q * 2 * TW, 2, 2);
                            else block_rows(tile, v + q * ps, ix + q * ps, ps, kbn, pp + q * 2 * TW, 2, 1);
                        }
                    }
                }
                jb += kbn;
            }
            for (int t = 0; t < nt; t++) {
                float *yr = y + (int64_t)(t0 + t) * O;
                for (int p = p0; p < p1; p++) {
                    yr[2 * p] = part[((p - p0) * 2) * TW + t];
                    if (2 * p + 1 < O) yr[2 * p + 1] = part[((p - p0) * 2 + 1) * TW + t];
                }
            }
        }
        free(tile);
        free(part);
    }
}

/* One token. x padded with >= 16 floats past K. y: O8 = 8 * octets floats (padded rows dropped by
 * the caller). */
void nm_linear_vector(const float *x, const float *lvals, const uint8_t *lpos, int O8, int K, int N, int M,
                      const float *bias, float *y, int threads) {
    const int G = K / M, Q = O8 / 8;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int q = 0; q < Q; q++) {
        const float *v = lvals + (int64_t)q * G * N * 8;
        const uint8_t *ps = lpos + (int64_t)q * G * N * 8;
#ifdef __AVX2__
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        if (M <= 8) {
            for (int g = 0; g < G; g++) {
                __m256 xg = _mm256_loadu_ps(x + g * M);
                for (int s = 0; s < N; s++, v += 8, ps += 8) {
                    __m256i sel = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)ps));
                    __m256 xs = _mm256_permutevar8x32_ps(xg, sel);
                    if (s & 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v), xs, a1);
                    else a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), xs, a0);
                }
            }
        } else if (M <= 16) {
            const __m256i seven = _mm256_set1_epi32(7);
            for (int g = 0; g < G; g++) {
                __m256 lo = _mm256_loadu_ps(x + g * M), hi = _mm256_loadu_ps(x + g * M + 8);
                for (int s = 0; s < N; s++, v += 8, ps += 8) {
                    __m256i sel = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)ps));
                    __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(sel, seven));
                    __m256 xs = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, sel),
                                                 _mm256_permutevar8x32_ps(hi, sel), upper);
                    if (s & 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v), xs, a1);
                    else a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), xs, a0);
                }
            }
        } else {
            for (int g = 0; g < G; g++) {
                __m256i base = _mm256_set1_epi32(g * M);
                for (int s = 0; s < N; s++, v += 8, ps += 8) {
                    __m256i sel = _mm256_add_epi32(base, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)ps)));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), _mm256_i32gather_ps(x, sel, 4), a0);
                }
            }
        }
        __m256 acc = _mm256_add_ps(a0, a1);
        if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias + 8 * q));
        _mm256_storeu_ps(y + 8 * q, acc);
#else
        float acc[8] = {0};
        for (int g = 0; g < G; g++)
            for (int s = 0; s < N; s++, v += 8, ps += 8)
                for (int l = 0; l < 8; l++) acc[l] += v[l] * x[g * M + ps[l]];
        for (int l = 0; l < 8; l++) y[8 * q + l] = acc[l] + (bias ? bias[8 * q + l] : 0.0f);
#endif
    }
}

/* Top-k by quick-select (the software twin of SpAtten's top-k engine, sparsetx/hw/topk.py): writes
 * the indices of the k largest of s[0..n) to out in ascending index order; ties at the threshold go
 * to the earlier index (the same choice as a stable sort). work: 2 * n doubles. Returns 0, or -1
 * (and writes nothing) when s holds a NaN. */
int topk_select(const double *s, int n, int k, double *work, int64_t *out) {
    double *a = work, *b = work + n, thr;
    for (int i = 0; i < n; i++) {
        if (s[i] != s[i]) return -1;
        a[i] = s[i];
    }
    int len = n, need = k;  /* the need-th largest of a[0..len) is the threshold */
    while (1) {
        double pivot = a[len / 2];
        int hi = 0, eq = 0, w = 0;
        for (int i = 0; i < len; i++) {
            hi += a[i] > pivot;
            eq += a[i] == pivot;
        }
        if (need <= hi) {
            for (int i = 0; i < len; i++) if (a[i] > pivot) b[w++] = a[i];
        } else if (need <= hi + eq) {
            thr = pivot;
            break;
        } else {
            need -= hi + eq;
            for (int i = 0; i < len; i++) if (a[i] < pivot) b[w++] = a[i];
        }
        double *t = a; a = b; b = t; len = w;
    }
    int above = 0, w = 0;
    for (int i = 0; i < n; i++) above += s[i] > thr;
    int ties = k - above;
    for (int i = 0; i < n; i++) {
        if (s[i] > thr) out[w++] = i;
        else if (s[i] == thr && ties > 0) { out[w++] = i; ties--; }
    }
    return 0;
}
