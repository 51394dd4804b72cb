/* N:M sparse x dense on the CPU (sparsetx issue: fast CPU kernels).
 *
 * y (T x O) = x (T x K) W^T, W (O x K) N:M along K. Two weight layouts, both made once per weight by
 * sparsetx/kernels/nm_linear.py in the order the kernels read them:
 *
 * 1. Group layout (many tokens). Rows in groups of ROWG = 3 (O padded with zero rows); K in
 *    blocks of KB columns (a multiple of M chosen by the caller), so every row keeps exactly
 *    KB / M * N weights per block. For group p, block b, kept slot j, row r in 0..ROWG-1:
 *        vals[p * ROWG * kn + ROWG * (b * KB / M * N) + ROWG * j + r]  (fp32)
 *        idx [same]                                   (uint16, (column - b * KB) * 32)
 *    The offsets array carries 4 codes of padding: a group's ROWG codes are read as one 64-bit
 *    word (one load instead of three; 5-15 % faster at T = 128).
 *    kn = K / M * N. Each thread copies a tile of TW tokens x KB columns of x into a column-major
 *    tile (TW floats per column, 16-32 KiB for TW = 32), so a kept weight is one broadcast and
 *    TW / 8 FMAs over contiguous tokens: STA's "select the operand by its index", done by an
 *    address. 3 rows x 4 vectors (TW = 32), 6 rows x 2 vectors (TW = 16) or 12 rows x 1 vector
 *    (TW = 8) keep 12 independent FMA chains in flight (8 left the 4-cycle FMA latency exposed).
 *
 * 2. Lane layout (one token, decoding). Rows in octets (O padded to a multiple of 8); octet q,
 *    group g, slot s: 8 values (one per row) and 8 in-group positions (uint8):
 *        lvals[((q * ROWG + g) * N + s) * 8 + lane], lpos[same], ROWG = K / M.
 *    The M inputs of group g sit in one or two registers; vpermps picks each row's input by its
 *    position: no memory gather. STA's operand multiplexer, in-register. M > 16 uses a gather.
 *
 * 3. Mask layout (one token, int8 values keeping at least half of the inputs; see mask_linear below):
 *    per row the kept values, and one byte a group of 8 inputs saying which are kept. The decode
 *    step of a whole Llama model (llama_step, at the end) reads it, and the two above.
 *
 * 4. Pair layout (many tokens, int8 values; see nm_linear_pairs): each row's kept inputs two at a
 *    time, an index into the K block's list of distinct column pairs, for an integer engine on
 *    int16 activations (vpmaddwd: 16 multiply-adds an instruction against an FMA's 8). int8
 *    weights take it instead of layout 1.
 *
 * Dense x dense runs through the same code with N = M; attention without a causal mask (an
 * encoder's) has its own blocked kernel (attention_encoder), the decoder's one-row kernel is
 * attention_fused.
 */
#define _GNU_SOURCE   /* clock_gettime, pthread; sched_getcpu and CPU sets (the pool, section 9) */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <math.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAXTW 32

#if defined(__AVX2__)
/* exp(x) for a vector of floats: x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite),
 * exp(r) by a degree-6 polynomial (Cephes coefficients), then times 2^n. Relative error about 2e-7;
 * exp(-inf) = 0. EXP_POLY is the body both widths share: W is the intrinsics' prefix, V the vector
 * type, ROUND the rounding operation (its name differs by width); it leaves n and p = exp(r). */
#define EXP_POLY(W, V, ROUND, x)                                                                    \
    V n = ROUND(W##_mul_ps(x, W##_set1_ps(1.44269504088896341f)),                                    \
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                                     \
    V r = W##_fnmadd_ps(n, W##_set1_ps(0.693359375f), x);                                           \
    r = W##_fnmadd_ps(n, W##_set1_ps(-2.12194440e-4f), r);                                          \
    V p = W##_set1_ps(1.9875691500e-4f);                                                            \
    p = W##_fmadd_ps(p, r, W##_set1_ps(1.3981999507e-3f));                                          \
    p = W##_fmadd_ps(p, r, W##_set1_ps(8.3334519073e-3f));                                          \
    p = W##_fmadd_ps(p, r, W##_set1_ps(4.1665795894e-2f));                                          \
    p = W##_fmadd_ps(p, r, W##_set1_ps(1.6666665459e-1f));                                          \
    p = W##_fmadd_ps(p, r, W##_set1_ps(5.0000001201e-1f));                                          \
    p = W##_fmadd_ps(p, W##_mul_ps(r, r), W##_add_ps(r, W##_set1_ps(1.0f)))

/* AVX2: x clamped to [-87.3, 88.3] so that n + 127 fits the exponent bits, 2^n built there, 0 below. */
static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), under = x;
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
    EXP_POLY(_mm256, __m256, _mm256_round_ps, x);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(under, lo, _CMP_LT_OQ), p);   /* below -87.3: 0 */
}

#ifdef __AVX512F__
/* AVX-512: vscalefps multiplies by 2^n in one step (the same product where AVX2's fits); below
 * -87.3 (and -inf, where r is NaN) 0, as above. */
static inline __m512 exp512(__m512 x) {
    EXP_POLY(_mm512, __m512, _mm512_roundscale_ps, x);
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), p, n);
}
#endif

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* GELU, erf form: 0.5 x (1 + erf(x / sqrt 2)), erf(z) = z P(z^2) / Q(z^2) on z = x / sqrt 2 clamped
 * to [-4, 4] (beyond, erf is 1 to float precision), P of degree 6 and Q of degree 4, fitted here by
 * iterated weighted least squares on [0, 4] (relative error of erf(z) / z 9.7e-8; GELU within 1.4e-6
 * of erf-exact on [-7, 7] in float arithmetic); 1 / Q by the hardware reciprocal and one Newton step.
 * About 20 operations, where an exp-based form (Abramowitz and Stegun 7.1.26: a division and an exp)
 * took 30 and a fifth of the FFN-in layer's time on AVX2. GELU_RATIONAL is the body both widths
 * share (W the intrinsics' prefix, V the vector type, RCP the reciprocal estimate). */
#define GELU_RATIONAL(W, V, RCP, x)                                                                         \
    const V z = W##_min_ps(W##_max_ps(W##_mul_ps(x, W##_set1_ps(0.70710678118654752f)), W##_set1_ps(-4.0f)), \
                           W##_set1_ps(4.0f));                                                              \
    const V w = W##_mul_ps(z, z);                                                                           \
    V p = W##_fmadd_ps(w, W##_set1_ps(1.92992430787179e-08f), W##_set1_ps(-1.9292451998201132e-06f));      \
    p = W##_fmadd_ps(w, p, W##_set1_ps(1.4264940317182477e-04f));                                           \
    p = W##_fmadd_ps(w, p, W##_set1_ps(3.790816099459311e-03f));                                            \
    p = W##_fmadd_ps(w, p, W##_set1_ps(5.088608444028887e-02f));                                            \
    p = W##_fmadd_ps(w, p, W##_set1_ps(2.0240793381133934e-01f));                                           \
    p = W##_fmadd_ps(w, p, W##_set1_ps(1.1283791352564214f));                                               \
    V q = W##_fmadd_ps(w, W##_set1_ps(9.732773918366385e-04f), W##_set1_ps(1.4549662894106896e-02f));      \
    q = W##_fmadd_ps(w, q, W##_set1_ps(1.1600851517815117e-01f));                                           \
    q = W##_fmadd_ps(w, q, W##_set1_ps(5.127113058942648e-01f));                                            \
    q = W##_fmadd_ps(w, q, W##_set1_ps(1.0f));                                                              \
    V r = RCP(q);                                                                                           \
    r = W##_mul_ps(r, W##_fnmadd_ps(q, r, W##_set1_ps(2.0f)));   /* r (2 - q r) */                          \
    const V erf = W##_mul_ps(W##_mul_ps(z, p), r), half = W##_mul_ps(x, W##_set1_ps(0.5f));               \
    return W##_fmadd_ps(half, erf, half)

static inline __m256 gelu256(__m256 x) { GELU_RATIONAL(_mm256, __m256, _mm256_rcp_ps, x); }

#ifdef __AVX512F__
static inline __m512 gelu512(__m512 x) { GELU_RATIONAL(_mm512, __m512, _mm512_rcp14_ps, x); }
#endif
#endif

/* dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols: 8 x 8 blocks transposed
 * in registers (unpack, shuffle, permute), the edges one by one. */
static void transpose(const float *src, int64_t src_stride, float *dst, int64_t dst_stride, int rows, int cols) {
    int i = 0;
#ifdef __AVX2__
    for (; i + 8 <= rows; i += 8) {
        int j = 0;
        for (; j + 8 <= cols; j += 8) {
            __m256 r[8], t[8], u[8];
            for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(src + (i + k) * src_stride + j);
            for (int k = 0; k < 8; k += 2) {
                t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
                t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
            }
            for (int k = 0; k < 8; k += 4) {
                u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
                u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
                u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
                u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int k = 0; k < 4; k++) {
                _mm256_storeu_ps(dst + (j + k) * dst_stride + i, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
                _mm256_storeu_ps(dst + (j + k + 4) * dst_stride + i, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
            }
        }
        for (; j < cols; j++)
            for (int k = 0; k < 8; k++) dst[j * dst_stride + i + k] = src[(i + k) * src_stride + j];
    }
#endif
    for (; i < rows; i++)
        for (int j = 0; j < cols; j++) dst[j * dst_stride + i] = src[i * src_stride + j];
}

/* x rows t0..t0+nt, columns c0..c0+nc -> tile[c * TW + t], tokens nt..TW zero. */
static void pack_tile(const float *x, int64_t ldx, int t0, int nt, int c0, int nc, int TW, float *tile) {
    if (nt < TW) memset(tile, 0, sizeof(float) * (size_t)nc * TW);
    transpose(x + (int64_t)t0 * ldx + c0, ldx, tile, TW, nt, nc);
}

#define ROWG 3  /* rows a group interleaves in the weight layout: ROW_GROUP in nm_linear.py must match */
#define PANEL 512  /* row groups whose partial sums a thread keeps at once (a multiple of 4) */

static inline __attribute__((always_inline)) void block_rows(
    const float *tile, const float *v, int64_t vstride, const uint16_t *ix, int64_t group_stride, int kbn,
    float *part, const int R, const int NV) {
    const int TW = NV * 8, SHIFT = NV == 4 ? 0 : (NV == 2 ? 1 : 2);  /* idx holds column * 32 */
#ifdef __AVX2__
    __m256 acc[4 * ROWG][4];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < NV; u++) acc[r][u] = _mm256_loadu_ps(part + r * TW + u * 8);
    for (int j = 0; j < kbn; j++) {
        for (int g = 0; g < R / ROWG; g++) {
            int64_t o = g * group_stride + ROWG * j, ov = g * vstride + ROWG * j;
            uint64_t codes;  /* the group's ROWG 16-bit offsets in one load (the array is padded) */
            memcpy(&codes, ix + o, sizeof codes);
            for (int rr = 0; rr < ROWG; rr++) {
                int r = g * ROWG + rr;
                const float *p = tile + (((codes >> (16 * rr)) & 0xffff) >> SHIFT);
                __m256 w = _mm256_broadcast_ss(v + ov + rr);
                for (int u = 0; u < NV; u++) acc[r][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + u * 8), acc[r][u]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < NV; u++) _mm256_storeu_ps(part + r * TW + u * 8, acc[r][u]);
#else
    for (int j = 0; j < kbn; j++)
        for (int r = 0; r < R; r++) {
            int64_t o = (r / ROWG) * group_stride + ROWG * j + (r % ROWG);
            const float *p = tile + ((size_t)ix[o] >> SHIFT);
            float w = v[(r / ROWG) * vstride + ROWG * j + (r % ROWG)];
            for (int t = 0; t < TW; t++) part[r * TW + t] += w * p[t];
        }
#endif
}

/* dst[i] = (float)src[i] for n fp16 values (F16C 8 at a time where it built). */
static void halves_to_floats(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) {  /* IEEE binary16 -> binary32 by hand: the tail, or a build without F16C */
        uint32_t h = src[i], sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
        if (e == 0x1f) bits = sign | 0x7f800000u | (m << 13);
        else if (e) bits = sign | ((e + 112) << 23) | (m << 13);
        else if (!m) bits = sign;
        else {  /* subnormal: normalise */
            e = 113;
            while (!(m & 0x400)) { m <<= 1; e--; }
            bits = sign | (e << 23) | ((m & 0x3ff) << 13);
        }
        memcpy(dst + i, &bits, sizeof bits);
    }
}

/* int8 values of row groups p0..p1 (layout p * ROWG * kn + ROWG * j + r) times their row's scale
 * (scales[p * ROWG + r]) -> fp32. Rows cycle with period ROWG = 3, so 24 values use three fixed
 * vectors of scales. */
static void int8_groups_to_floats(const int8_t *src, const float *scales, float *dst, int p0, int p1, int64_t kn) {
    for (int p = p0; p < p1; p++) {
        const int8_t *s = src + (int64_t)p * ROWG * kn;
        const float *sc = scales + (int64_t)p * ROWG;
        float *d = dst + (int64_t)(p - p0) * ROWG * kn;
        int64_t n = ROWG * kn, i = 0;
#ifdef __AVX2__
        const __m256 s0 = _mm256_setr_ps(sc[0], sc[1], sc[2], sc[0], sc[1], sc[2], sc[0], sc[1]);
        const __m256 s1 = _mm256_setr_ps(sc[2], sc[0], sc[1], sc[2], sc[0], sc[1], sc[2], sc[0]);
        const __m256 s2 = _mm256_setr_ps(sc[1], sc[2], sc[0], sc[1], sc[2], sc[0], sc[1], sc[2]);
        for (; i + 24 <= n; i += 24) {
            __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s + i))));
            __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s + i + 8))));
            __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s + i + 16))));
            _mm256_storeu_ps(d + i, _mm256_mul_ps(a, s0));
            _mm256_storeu_ps(d + i + 8, _mm256_mul_ps(b, s1));
            _mm256_storeu_ps(d + i + 16, _mm256_mul_ps(c, s2));
        }
#endif
        for (; i < n; i++) d[i] = (float)s[i] * sc[i % ROWG];
    }
}

/* Many tokens. x: T rows of K floats, row stride ldx. y: T x O (row stride O). vals: fp32 (vtype
 * 0), fp16 (1) or int8 with per-row scales (2; scales padded to whole row groups): the stored form
 * at a half or a quarter of the bytes. Each thread converts its rows' values once a call into a
 * buffer it keeps, so the inner loop is the same fp32 one. */
void nm_linear_tokens(const float *x, int64_t ldx, int T, int K, const void *vals_in, const uint16_t *idx,
                      int O, int kn, int N, int M, int KB, const float *bias, float *y, int vtype,
                      const float *scales, int threads) {
    const int P = (O + ROWG - 1) / ROWG;                  /* row groups */
    const int TW = T > 16 ? 32 : (T > 8 ? 16 : 8);  /* tokens per tile */
    const int NV = TW / 8, R = 4 * ROWG / NV;          /* rows per step: 4 ROWG FMA chains */
    const int64_t ps = ROWG * (int64_t)kn;             /* floats per group */
    #pragma omp parallel num_threads(threads)
    {
        int nth = 1, me = 0;
#ifdef _OPENMP
        nth = omp_get_num_threads(); me = omp_get_thread_num();
#endif
        /* this thread's row groups, in whole steps of R / ROWG groups */
        int steps = (P + R / ROWG - 1) / (R / ROWG);
        int s0 = (int)((int64_t)steps * me / nth), s1 = (int)((int64_t)steps * (me + 1) / nth);
        int p0 = s0 * (R / ROWG), p1 = s1 * (R / ROWG) < P ? s1 * (R / ROWG) : P;
        float *tile = aligned_alloc(64, sizeof(float) * (size_t)KB * MAXTW);
        float *part = aligned_alloc(64, sizeof(float) * (size_t)(PANEL + R) * ROWG * MAXTW + 64);
        /* Row groups a panel at a time, so a panel's partial sums (PANEL x 3 rows x 32 tokens, 192
         * KiB) stay in L2 across the K blocks: a 49152-row LM head once streamed 6 MiB of them
         * through memory every block. fp16 / int8 values: the panel's rows converted once a call
         * into a buffer the thread keeps (a panel's worth: the stored form stays as packed, the
         * inner loop stays fp32). */
        static __thread float *vbuf = NULL;
        static __thread int64_t vcap = 0;
        for (int q0 = p0; q0 < p1; q0 += PANEL) {
            const int q1 = q0 + PANEL < p1 ? q0 + PANEL : p1;
            const float *vals = (const float *)vals_in;
            int vbase = 0;   /* the row group vals[0] belongs to */
            if (vtype) {
                int64_t need = (int64_t)(q1 - q0) * ps;
                if (need > vcap) {
                    free(vbuf);
                    vbuf = malloc(sizeof(float) * (size_t)need);
                    vcap = vbuf ? need : 0;
                }
                if (vbuf && vtype == 1) halves_to_floats((const uint16_t *)vals_in + q0 * ps, vbuf, need);
                else if (vbuf) int8_groups_to_floats((const int8_t *)vals_in, scales, vbuf, q0, q1, kn);
                vals = vbuf, vbase = q0;
            }
            for (int t0 = 0; t0 < T; t0 += TW) {
                int nt = T - t0 < TW ? T - t0 : TW;
                for (int p = q0; p < q1; p++)
                    for (int r = 0; r < ROWG; r++) {
                        int o = ROWG * p + r;
                        float b = (bias && o < O) ? bias[o] : 0.0f;
                        for (int t = 0; t < TW; t++) part[((p - q0) * ROWG + r) * TW + t] = b;
                    }
                for (int c0 = 0, jb = 0; c0 < K; c0 += KB) {
                    int nc = K - c0 < KB ? K - c0 : KB;
                    int kbn = nc / M * N;
                    pack_tile(x, ldx, t0, nt, c0, nc, TW, tile);
                    for (int p = q0; p < q1; p += R / ROWG) {
                        const uint16_t *ix = idx + p * ps + ROWG * jb;
                        float *pp = part + (p - q0) * ROWG * TW;
                        int ng = p + R / ROWG <= q1 ? R / ROWG : q1 - p;
                        const float *v = vals + (p - vbase) * ps + ROWG * jb;
                        const int64_t vs = ps;
                        if (ng == R / ROWG) {
                            if (NV == 4) block_rows(tile, v, vs, ix, ps, kbn, pp, ROWG, 4);
                            else if (NV == 2) block_rows(tile, v, vs, ix, ps, kbn, pp, 2 * ROWG, 2);
                            else block_rows(tile, v, vs, ix, ps, kbn, pp, 4 * ROWG, 1);
                        } else {  /* the last groups of this thread, one at a time */
                            for (int q = 0; q < ng; q++) {
                                if (NV == 2) block_rows(tile, v + q * vs, vs, ix + q * ps, ps, kbn, pp + q * ROWG * TW, ROWG, 2);
                                else block_rows(tile, v + q * vs, vs, ix + q * ps, ps, kbn, pp + q * ROWG * TW, ROWG, 1);
                            }
                        }
                    }
                    jb += kbn;
                }
                /* part holds the panel's rows x TW tokens: transpose into y's tokens x O */
                int o0 = ROWG * q0, o1 = ROWG * q1 < O ? ROWG * q1 : O;
                transpose(part, TW, y + (int64_t)t0 * O + o0, O, o1 - o0, nt);
            }
        }
        free(tile);
        free(part);
    }
}

/* ---- 4. Pair layout (many tokens, int8 values): an integer N:M engine -------------------------
 *
 * vpmaddwd multiplies two adjacent int16 pairs and adds them: 16 MACs an instruction, twice an fp32
 * FMA's 8, exact in int32. It needs both inputs a row multiplies side by side, and the inputs a row
 * keeps are its own. So each K block's kept inputs of a row are taken two at a time, in order (an odd
 * count ends with a zero-weight partner), and the block's distinct (column, column) pairs are listed
 * once for the whole weight: 2:8 has at most 28 a group of 8, 1:8 (pairs across two groups) 64 for
 * two, every row of the layer sharing them. Per token tile the activations are quantised per token
 * (int16, scale max|x| / qmax, qmax small enough that no int32 sum can overflow) and each listed
 * pair built once as int16 pairs, token by token; a row then reads its pair by index: one 32-bit
 * broadcast of its two int16 weights (the int8 values, row scale applied at the end) and a multiply-add
 * per 8 tokens. STA's fixed-point datapath with its index-selected operands, for the CPU.
 *
 * Layout (sparsetx/kernels/nm_linear.py KernelWeight.pair_layout), rows in groups of ROWG (P
 * groups, padded), K in blocks of KB columns, npb pairs a row in block b, jb pairs a row before it;
 * block by block, so a block's weights are one contiguous stream:
 *     wpair[P * ROWG * jb + p * ROWG * npb + ROWG * j + r]  int32: w1 | w2 << 16 (int8 as int16)
 *     poff [same]                    uint16: the pair's index in its block's list x 64; the kernel
 *                                    scales it by PAIR_TW / 16 to a byte offset in its pair
 *                                    buffer (PAIR_TW x 4 bytes a pair); 4 of padding
 *     pcols[2 * i], pcols[2 * i + 1] uint16: pair i's columns, relative to its block
 *     pstart[b] .. pstart[b + 1]     the pairs of block b in pcols
 */
#define PAIR_TW 32   /* tokens a pair tile (16 measured slower: a broadcast feeds only 2 multiply-adds) */

#define PAIR_NV (PAIR_TW / 8)
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
/* AVX-512 VNNI: vpdpwssd multiplies, pairs and accumulates in one instruction, 32 MACs on a zmm;
 * 12 rows x 2 zmm of sums stay in registers (32 of them) */
#define PAIR_ZMM 1
#define PAIR_R (4 * ROWG)
#else
#define PAIR_ZMM 0
#define PAIR_R (4 * ROWG / PAIR_NV)
#endif

/* One step of the pair loop on either width: zmm with vpdpwssd (multiply, pair, accumulate: one
 * instruction), or ymm with vpmaddwd + vpaddd. */
#if PAIR_ZMM
typedef __m512i pair_vec;
#define PAIR_LANES 16
#define PV_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define PV_STORE(p, v) _mm512_storeu_si512((void *)(p), v)
#define PV_MAC(acc, a, w) _mm512_dpwssd_epi32(acc, a, w)
#define PV_SET1(w) _mm512_set1_epi32(w)
#elif defined(__AVX2__)
typedef __m256i pair_vec;
#define PAIR_LANES 8
#define PV_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define PV_STORE(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define PV_MAC(acc, a, w) _mm256_add_epi32(acc, _mm256_madd_epi16(a, w))
#define PV_SET1(w) _mm256_set1_epi32(w)
#endif

static inline __attribute__((always_inline)) void block_pairs(
    const int32_t *pb, const int32_t *w, const uint16_t *off, int64_t stride, int npb, int32_t *part, const int R) {
#if PAIR_ZMM || defined(__AVX2__)
    enum { NV = PAIR_TW / PAIR_LANES };
    pair_vec acc[PAIR_R][NV];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < NV; u++) acc[r][u] = PV_LOAD(part + r * PAIR_TW + u * PAIR_LANES);
    for (int j = 0; j < npb; j++) {
        for (int g = 0; g < R / ROWG; g++) {
            int64_t o = g * stride + ROWG * j;
            uint64_t codes;
            memcpy(&codes, off + o, sizeof codes);
            for (int rr = 0; rr < ROWG; rr++) {
                int r = g * ROWG + rr;
                const char *p = (const char *)pb + ((codes >> (16 * rr)) & 0xffff) * (PAIR_TW / 16);
                pair_vec wv = PV_SET1(w[o + rr]);
                for (int u = 0; u < NV; u++) acc[r][u] = PV_MAC(acc[r][u], PV_LOAD(p + 4 * PAIR_LANES * u), wv);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < NV; u++) PV_STORE(part + r * PAIR_TW + u * PAIR_LANES, acc[r][u]);
#else
    for (int j = 0; j < npb; j++)
        for (int r = 0; r < R; r++) {
            int64_t o = (r / ROWG) * stride + ROWG * j + (r % ROWG);
            const int16_t *p = (const int16_t *)((const char *)pb + (size_t)off[o] * (PAIR_TW / 16));
            int32_t wv = w[o];
            int16_t w1 = (int16_t)(wv & 0xffff), w2 = (int16_t)((uint32_t)wv >> 16);
            for (int t = 0; t < PAIR_TW; t++) part[r * PAIR_TW + t] += (int32_t)p[2 * t] * w1 + (int32_t)p[2 * t + 1] * w2;
        }
#endif
}


/* Per-token scales of tokens t0..t0+nt of x: max |x| -> qmax (sx: the scale, inv: its inverse). */
static void token_scales(const float *x, int64_t ldx, int t0, int nt, int K, int qmax, float *sx, float *inv, int n) {
    for (int t = 0; t < n; t++) {
        float mx = 0.0f;
        if (t < nt) {
            const float *xr = x + (int64_t)(t0 + t) * ldx;
            int k = 0;
#ifdef __AVX512F__
            if (K >= 64) {   /* four chains of 16 (the max is exact: the same scale as below) */
                __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
                for (; k + 64 <= K; k += 64) {
                    m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
                    m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(xr + k + 16)));
                    m2 = _mm512_max_ps(m2, _mm512_abs_ps(_mm512_loadu_ps(xr + k + 32)));
                    m3 = _mm512_max_ps(m3, _mm512_abs_ps(_mm512_loadu_ps(xr + k + 48)));
                }
                for (; k + 16 <= K; k += 16) m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
                mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
            }
#endif
#ifdef __AVX2__
            __m256 m8 = _mm256_setzero_ps(), ab = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            for (; k + 8 <= K; k += 8) m8 = _mm256_max_ps(m8, _mm256_and_ps(_mm256_loadu_ps(xr + k), ab));
            float m[8];
            _mm256_storeu_ps(m, m8);
            for (int i = 0; i < 8; i++) mx = m[i] > mx ? m[i] : mx;
#endif
            for (; k < K; k++) mx = fabsf(xr[k]) > mx ? fabsf(xr[k]) : mx;
        }
        sx[t] = mx > 0.0f ? mx / (float)qmax : 0.0f;
        inv[t] = mx > 0.0f ? (float)qmax / mx : 0.0f;
    }
}

/* One token tile of a K block: x's columns c0..c0+nc quantised (int32 lanes holding int16), then
 * the block's listed pairs i0..i1 built from them (pb: pair i at (i - i0) * PAIR_TW int32). */
static void build_pairs(const float *x, int64_t ldx, int t0, int nt, int c0, int nc, const float *inv,
                        const uint16_t *pcols, int i0, int i1, float *tile, int32_t *qt, int32_t *pb) {
    const int TW = PAIR_TW;
    pack_tile(x, ldx, t0, nt, c0, nc, TW, tile);
    for (int c = 0; c < nc; c++) {
#ifdef __AVX2__
        for (int u = 0; u < TW; u += 8)
            _mm256_store_si256((__m256i *)(qt + c * TW + u), _mm256_cvtps_epi32(
                _mm256_mul_ps(_mm256_load_ps(tile + c * TW + u), _mm256_loadu_ps(inv + u))));
#else
        for (int t = 0; t < TW; t++) qt[c * TW + t] = (int32_t)lrintf(tile[c * TW + t] * inv[t]);
#endif
    }
    for (int i = i0; i < i1; i++) {
        const int32_t *a = qt + pcols[2 * i] * TW, *c = qt + pcols[2 * i + 1] * TW;
        int32_t *d = pb + (i - i0) * TW;
#ifdef __AVX2__
        for (int u = 0; u < TW; u += 8)
            _mm256_store_si256((__m256i *)(d + u), _mm256_blend_epi16(
                _mm256_load_si256((const __m256i *)(a + u)),
                _mm256_slli_epi32(_mm256_load_si256((const __m256i *)(c + u)), 16), 0xAA));
#else
        for (int t = 0; t < TW; t++) d[t] = (int32_t)(((uint32_t)a[t] & 0xffffu) | ((uint32_t)c[t] << 16));
#endif
    }
}

/* One pair-kernel linear's operands (nm_linear_pairs' arguments). */
typedef struct {
    const float *x; int64_t ldx; int T, K;
    const int32_t *wpair; const uint16_t *poff, *pcols; const int32_t *pstart;
    int O, N, M, KB; const float *scales, *bias; float *y; int qmax, act;
} PairArgs;

/* Token tiles tt0..tt1 (PAIR_TW tokens each) of a pair-kernel linear, row groups p0..p1, with
 * scratch of its own: the work of one thread (OpenMP) or one chunk (the encoder's pool). */
static void pairs_part(const PairArgs *a, int tt0, int tt1, int p0, int p1) {
    const float *x = a->x;
    const int64_t ldx = a->ldx;
    const int T = a->T, K = a->K, O = a->O, N = a->N, M = a->M, KB = a->KB, qmax = a->qmax, act = a->act;
    const int P = (O + ROWG - 1) / ROWG, TW = PAIR_TW, R = PAIR_R;
    const float *scales = a->scales, *bias = a->bias;
    float *y = a->y;
    int maxpairs = 0;
    for (int b = 0, nb = (K + KB - 1) / KB; b < nb; b++)
        if (a->pstart[b + 1] - a->pstart[b] > maxpairs) maxpairs = a->pstart[b + 1] - a->pstart[b];
    float *tile = aligned_alloc(64, sizeof(float) * (size_t)KB * TW);
    int32_t *qt = aligned_alloc(64, sizeof(int32_t) * (size_t)KB * TW);
    int32_t *pb = aligned_alloc(64, sizeof(int32_t) * ((size_t)maxpairs + 1) * TW);
    int32_t *part = aligned_alloc(64, sizeof(int32_t) * (size_t)(PANEL + R) * ROWG * TW + 64);
    float *fp = (float *)part;   /* the sums become the outputs in place */
    float sx[PAIR_TW], inv[PAIR_TW];
    for (int q0 = p0; q0 < p1; q0 += PANEL) {
        const int q1 = q0 + PANEL < p1 ? q0 + PANEL : p1;
        for (int t0 = tt0 * TW; t0 < T && t0 < tt1 * TW; t0 += TW) {
            const int nt = T - t0 < TW ? T - t0 : TW;
            token_scales(x, ldx, t0, nt, K, qmax, sx, inv, TW);
            memset(part, 0, sizeof(int32_t) * (size_t)(q1 - q0) * ROWG * TW);
            for (int c0 = 0, jb = 0, b = 0; c0 < K; c0 += KB, b++) {
                int nc = K - c0 < KB ? K - c0 : KB;
                int npb = (nc / M * N + 1) / 2;
                /* block b's pairs of row group p: ROWG x npb values at P * ROWG * jb + p * ROWG * npb */
                const int32_t *wb = a->wpair + (int64_t)P * ROWG * jb;
                const uint16_t *ob = a->poff + (int64_t)P * ROWG * jb;
                const int64_t gs = ROWG * (int64_t)npb;
                build_pairs(x, ldx, t0, nt, c0, nc, inv, a->pcols, a->pstart[b], a->pstart[b + 1], tile, qt, pb);
                int p = q0;
                for (; p + R / ROWG <= q1; p += R / ROWG)
                    block_pairs(pb, wb + p * gs, ob + p * gs, gs, npb, part + (p - q0) * ROWG * TW, R);
                for (; p < q1; p++)
                    block_pairs(pb, wb + p * gs, ob + p * gs, gs, npb, part + (p - q0) * ROWG * TW, ROWG);
                jb += npb;
            }
            /* int32 sums -> fp32: row scale x token scale (+ bias; GELU when act = 1), in place, then into y */
            for (int p = q0; p < q1; p++)
                for (int r = 0; r < ROWG; r++) {
                    int o = ROWG * p + r;
                    float sw = scales[o], b = (bias && o < O) ? bias[o] : 0.0f;
                    int64_t e = ((int64_t)(p - q0) * ROWG + r) * TW;
                    int t = 0;
#ifdef __AVX2__
                    const __m256 swv = _mm256_set1_ps(sw), bv = _mm256_set1_ps(b);
                    for (; t < TW; t += 8) {
                        __m256 val = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(
                            (const __m256i *)(part + e + t))), swv), _mm256_loadu_ps(sx + t), bv);
                        _mm256_storeu_ps(fp + e + t, act ? gelu256(val) : val);
                    }
#endif
                    for (; t < TW; t++) {
                        float val = (float)part[e + t] * sw * sx[t] + b;
                        fp[e + t] = act ? 0.5f * val * (1.0f + erff(val * 0.70710678118654752f)) : val;
                    }
                }
            int o0 = ROWG * q0, o1 = ROWG * q1 < O ? ROWG * q1 : O;
            transpose(fp, TW, y + (int64_t)t0 * O + o0, O, o1 - o0, nt);
        }
    }
    free(tile); free(qt); free(pb); free(part);
}

/* Row groups p0..p1 of part `part` of `parts`, in whole steps of PAIR_R rows (the last part takes
 * the rest). */
static void pair_rows(int P, int part, int parts, int *p0, int *p1) {
    const int step = PAIR_R / ROWG, steps = (P + step - 1) / step;
    const int s0 = (int)((int64_t)steps * part / parts), s1 = (int)((int64_t)steps * (part + 1) / parts);
    *p0 = s0 * step;
    *p1 = s1 * step < P ? s1 * step : P;
}

/* A pair-kernel linear on an OpenMP team of `threads`. */
static void pairs_omp(const PairArgs *a, int threads) {
    const int P = (a->O + ROWG - 1) / ROWG, T = a->T;
    #pragma omp parallel num_threads(threads)
    {
        int nth = 1, me = 0;
#ifdef _OPENMP
        nth = omp_get_num_threads(); me = omp_get_thread_num();
#endif
        /* threads split the token tiles when there are enough (each builds only its own tiles'
         * pairs), else the rows (each builds every tile's pairs) */
        const int tiles = (T + PAIR_TW - 1) / PAIR_TW;
        int p0 = 0, p1 = P, tt0 = 0, tt1 = tiles;
        if (tiles >= nth) tt0 = (int)((int64_t)tiles * me / nth), tt1 = (int)((int64_t)tiles * (me + 1) / nth);
        else pair_rows(P, me, nth, &p0, &p1);
        pairs_part(a, tt0, tt1, p0, p1);
    }
}

void nm_linear_pairs(const float *x, int64_t ldx, int T, int K, const int32_t *wpair, const uint16_t *poff,
                     const uint16_t *pcols, const int32_t *pstart, int O, int N, int M, int KB,
                     const float *scales, const float *bias, float *y, int qmax, int act, int threads) {
    const PairArgs a = {x, ldx, T, K, wpair, poff, pcols, pstart, O, N, M, KB, scales, bias, y, qmax, act};
    pairs_omp(&a, threads);
}

/* ---- 5. Select layout (many tokens, int8 values, int8 activations): STA's operand multiplexer --
 *
 * SIMD lanes are output rows instead of tokens: a token's inputs of a K block (quantised per token
 * to 127 steps of max|x|) sit in one register, a byte shuffle hands each row the four inputs its
 * own indices pick (STA's index-driven operand multiplexer), and an int8 multiply-add multiplies
 * them by the row's four int8 weights and accumulates. No gather, no pair buffer, and the sums land
 * in the output's own layout (rows contiguous per token). Two geometries, one layout formula:
 *
 * - AVX-512 VBMI + VNNI (G = 16 rows a lane group, blocks of W = 64 columns): vpermb picks from
 *   all 64 input bytes for 16 rows, vpdpbusd multiplies and accumulates: two instructions for 64
 *   multiply-adds. vpdpbusd takes an unsigned operand: inputs held as x + 128, and the 128 x sum
 *   of a row's weights (wsum) taken off at the end.
 * - AVX2 (G = 8, W = 16 or 32): vpshufb picks within 16 bytes, so a block is 16 columns (or 32,
 *   two shuffles OR-ed, for patterns that keep fewer than 3 a 16: 1:8 keeps 4 of 32); vpsignb
 *   moves each weight's sign onto its input, vpmaddubsw multiplies |w| (unsigned, <= 128) by the
 *   signed input (|x| <= 127) in pairs to int16 (at most 2 x 128 x 127 = 32512: never saturates,
 *   so the sums are exact), vpmaddwd by ones widens the pairs to int32: 32 multiply-adds for a
 *   shuffle, a sign, two multiplies and an add, where the pair kernel needs a built pair buffer.
 *   The inputs are signed (no wsum).
 *
 * Layout (sparsetx/kernels/nm_linear.py KernelWeight.select_layout): rows in lane groups of G (L
 * groups), K in blocks of W columns, quads (4 kept inputs) sstart[b] .. sstart[b + 1] - 1 of a row
 * in block b (Q = sstart[nb] a row), lane group by lane group, so that a group's weights are one
 * contiguous stream (block-major read 2x slower on AVX2: a cache line a block):
 *     sidx[4G * (Q * l + q) + 4 * lane + i]  uint8: the column (in its block) of input i of quad q
 *                                            of row G l + lane
 *     sw  [same]                             int8: its weight (0 where padding)
 *     wsum[o]                                int32: 128 x the sum of row o's weights
 * The caller passes G and W (the Python side builds the layout for this library's has_select()). */

/* One select-kernel linear's operands (nm_linear_select's arguments). */
typedef struct {
    const float *x; int64_t ldx; int T, K;
    const uint8_t *sidx; const int8_t *sw; const int32_t *sstart, *wsum;
    int O, G, W; const float *scales, *bias; float *y; int act;
} SelArgs;

/* Bytes a token's quantised inputs take in a tile: K padded to a whole 64 (every geometry's W divides it). */
static inline int select_stride(int K) { return (K + 63) / 64 * 64; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define HAS_SELECT 1
#define SEL_G 16
#define SEL_TT 16   /* tokens a tile: 16 accumulators, each 16 rows of one token */

/* Tokens t0..t0+nt of x quantised: xq[t * kp + k] = round(x / s_t) + 128, s_t = max|x_t| / 127
 * (token_scales, the pair kernel's per-token scales at qmax 127), columns K..kp and tokens
 * nt..SEL_TT at 128 (zero). */
static void select_quantise(const float *x, int64_t ldx, int t0, int nt, int K, int kp, uint8_t *xq, float *sx) {
    float inv[SEL_TT];
    token_scales(x, ldx, t0, nt, K, 127, sx, inv, SEL_TT);
    const __m512i off = _mm512_set1_epi32(128);
    for (int t = 0; t < SEL_TT; t++) {
        uint8_t *q = xq + (int64_t)t * kp;
        if (t >= nt) { memset(q, 128, kp); continue; }
        const float *xr = x + (int64_t)(t0 + t) * ldx;
        const __m512 iv = _mm512_set1_ps(inv[t]);
        int k = 0;
        for (; k + 16 <= K; k += 16)
            _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(
                _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), iv)), off)));
        for (; k < K; k++) q[k] = (uint8_t)(lrintf(xr[k] * inv[t]) + 128);
        for (; k < kp; k++) q[k] = 128;
    }
}

/* Token tile tt (SEL_TT tokens) of a select linear, lane groups l0..l1 (16 rows each), from the
 * tile quantised by select_quantise (xq, per-token scales sx). */
static void select_lanes(const SelArgs *a, int tt, int l0, int l1, const uint8_t *xq, const float *sx) {
    const int nb = (a->K + 63) / 64, kp = select_stride(a->K), O = a->O, Q = a->sstart[nb];
    const int t0 = tt * SEL_TT, nt = a->T - t0 < SEL_TT ? a->T - t0 : SEL_TT;
    for (int l = l0; l < l1; l++) {
        __m512i acc[SEL_TT];
        _Pragma("GCC unroll 16") for (int t = 0; t < SEL_TT; t++) acc[t] = _mm512_setzero_si512();
        for (int b = 0; b < nb; b++) {
            const int S = a->sstart[b + 1] - a->sstart[b];
            const int64_t base = 64 * ((int64_t)Q * l + a->sstart[b]);
            const uint8_t *xb = xq + 64 * b;
            for (int s = 0; s < S; s++) {
                const __m512i ix = _mm512_loadu_si512((const void *)(a->sidx + base + 64 * s));
                const __m512i wv = _mm512_loadu_si512((const void *)(a->sw + base + 64 * s));
                _Pragma("GCC unroll 16") for (int t = 0; t < SEL_TT; t++)
                    acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_permutexvar_epi8(
                        ix, _mm512_load_si512((const void *)(xb + (int64_t)t * kp))), wv);
            }
        }
        /* (sum - 128 sum w) x row scale x token scale + bias (GELU when act = 1) */
        const int o0 = 16 * l, rows = O - o0 < 16 ? O - o0 : 16;
        const __mmask16 keep = rows == 16 ? 0xffff : (__mmask16)((1u << rows) - 1);
        const __m512i corr = _mm512_maskz_loadu_epi32(keep, a->wsum + o0);
        const __m512 sc = _mm512_maskz_loadu_ps(keep, a->scales + o0),
                     bv = a->bias ? _mm512_maskz_loadu_ps(keep, a->bias + o0) : _mm512_setzero_ps();
        for (int t = 0; t < nt; t++) {
            __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], corr)),
                                       _mm512_mul_ps(sc, _mm512_set1_ps(sx[t])), bv);
            if (a->act) v = gelu512(v);
            _mm512_mask_storeu_ps(a->y + (int64_t)(t0 + t) * O + o0, keep, v);
        }
    }
}
#elif defined(__AVX2__)
#define HAS_SELECT 1
#define SEL_G 8
#define SEL_TT 8    /* tokens a tile: 8 accumulators, each 8 rows of one token (16 ymm in all) */

/* Tokens t0..t0+nt of x quantised: xq[t * kp + k] = round(x / s_t) as int8, s_t = max|x_t| / 127
 * (token_scales at qmax 127, as above), columns K..kp and tokens nt..SEL_TT at 0. */
static void select_quantise(const float *x, int64_t ldx, int t0, int nt, int K, int kp, uint8_t *xq, float *sx) {
    float inv[SEL_TT];
    token_scales(x, ldx, t0, nt, K, 127, sx, inv, SEL_TT);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   /* undo the packs' lane interleave */
    for (int t = 0; t < SEL_TT; t++) {
        int8_t *q = (int8_t *)xq + (int64_t)t * kp;
        if (t >= nt) { memset(q, 0, kp); continue; }
        const float *xr = x + (int64_t)(t0 + t) * ldx;
        const __m256 iv = _mm256_set1_ps(inv[t]);
        int k = 0;
        for (; k + 32 <= K; k += 32) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), iv));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), iv));
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 16), iv));
            __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 24), iv));
            __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(q8, order));
        }
        for (; k < K; k++) q[k] = (int8_t)lrintf(xr[k] * inv[t]);
        for (; k < kp; k++) q[k] = 0;
    }
}

/* Quad q of every token of the tile: acc[t] += |w| . (x picked by the indices, signed as w).
 * DUAL: a 32-column block, the low and high 16 inputs each shuffled by their own indices (bit 7
 * set: a zero byte) and OR-ed. */
#define SEL_QUAD(DUAL)                                                                                      \
    do {                                                                                                    \
        const __m256i ix = _mm256_loadu_si256((const __m256i *)(ip + 32 * q));                              \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wp + 32 * q)), aw = _mm256_abs_epi8(wv);    \
        const __m256i lo = DUAL ? _mm256_or_si256(ix, _mm256_and_si256(_mm256_slli_epi16(ix, 3), hib)) : ix; \
        const __m256i hi = _mm256_sub_epi8(ix, sixteen);                                                   \
        const int8_t *xb = (const int8_t *)xq + col[q];                                                     \
        _Pragma("GCC unroll 8") for (int t = 0; t < SEL_TT; t++) {                                          \
            const int8_t *xt = xb + (int64_t)t * kp;                                                        \
            __m256i v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)xt)), lo); \
            if (DUAL)                                                                                       \
                v = _mm256_or_si256(v, _mm256_shuffle_epi8(                                                 \
                    _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(xt + 16))), hi));           \
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(                                            \
                _mm256_maddubs_epi16(aw, _mm256_sign_epi8(v, wv)), ones));                                  \
        }                                                                                                   \
    } while (0)

/* One flat loop over a lane group's quads (their block's first column from col[]): nested block
 * and quad loops let the compiler hoist the tile's broadcasts out of the quad loop and spill them,
 * measured 2x slower. */
static void select_lanes(const SelArgs *a, int tt, int l0, int l1, const uint8_t *xq, const float *sx) {
    const int W = a->W, nb = (a->K + W - 1) / W, kp = select_stride(a->K), O = a->O, Q = a->sstart[nb];
    const int t0 = tt * SEL_TT, nt = a->T - t0 < SEL_TT ? a->T - t0 : SEL_TT;
    const __m256i ones = _mm256_set1_epi16(1), hib = _mm256_set1_epi8((char)0x80), sixteen = _mm256_set1_epi8(16);
    int32_t col_small[512], *col = Q <= 512 ? col_small : malloc(sizeof(int32_t) * (size_t)Q);
    for (int b = 0; b < nb; b++)
        for (int q = a->sstart[b]; q < a->sstart[b + 1]; q++) col[q] = W * b;
    for (int l = l0; l < l1; l++) {
        __m256i acc[SEL_TT];
        _Pragma("GCC unroll 8") for (int t = 0; t < SEL_TT; t++) acc[t] = _mm256_setzero_si256();
        const uint8_t *ip = a->sidx + (int64_t)32 * Q * l;
        const int8_t *wp = a->sw + (int64_t)32 * Q * l;
        if (W == 16)
            _Pragma("GCC unroll 2") for (int q = 0; q < Q; q++) SEL_QUAD(0);   /* 3 % (min of 8, C harness) */
        else
            for (int q = 0; q < Q; q++) SEL_QUAD(1);
        /* sum x row scale x token scale + bias (GELU when act = 1) */
        const int o0 = 8 * l, rows = O - o0 < 8 ? O - o0 : 8;
        float scv[8] = {0}, bsv[8] = {0};
        for (int r = 0; r < rows; r++) scv[r] = a->scales[o0 + r], bsv[r] = a->bias ? a->bias[o0 + r] : 0.0f;
        const __m256 sc = _mm256_loadu_ps(scv), bv = _mm256_loadu_ps(bsv);
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int t = 0; t < nt; t++) {
            __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_mul_ps(sc, _mm256_set1_ps(sx[t])), bv);
            if (a->act) v = gelu256(v);
            float *yr = a->y + (int64_t)(t0 + t) * O + o0;
            if (rows == 8) _mm256_storeu_ps(yr, v);
            else _mm256_maskstore_ps(yr, keep, v);
        }
    }
    if (col != col_small) free(col);
}
#undef SEL_QUAD
#endif

#ifdef HAS_SELECT
int has_select(void) { return SEL_G; }

/* Token tile tt quantised into xq (SEL_TT x kp bytes of scratch), then lane groups l0..l1. */
static void select_tile(const SelArgs *a, int tt, int l0, int l1, uint8_t *xq) {
    const int t0 = tt * SEL_TT, nt = a->T - t0 < SEL_TT ? a->T - t0 : SEL_TT;
    float sx[SEL_TT];
    select_quantise(a->x, a->ldx, t0, nt, a->K, select_stride(a->K), xq, sx);
    select_lanes(a, tt, l0, l1, xq, sx);
}

void nm_linear_select(const float *x, int64_t ldx, int T, int K, const uint8_t *sidx, const int8_t *sw,
                      const int32_t *sstart, const int32_t *wsum, int O, int G, int W, const float *scales,
                      const float *bias, float *y, int act, int threads) {
    const SelArgs a = {x, ldx, T, K, sidx, sw, sstart, wsum, O, G, W, scales, bias, y, act};
    const int L = (O + SEL_G - 1) / SEL_G, kp = select_stride(K), tiles = (T + SEL_TT - 1) / SEL_TT;
    #pragma omp parallel num_threads(threads)
    {
        int nth = 1, me = 0;
#ifdef _OPENMP
        nth = omp_get_num_threads(); me = omp_get_thread_num();
#endif
        /* threads split the token tiles when there are enough, else the lane groups */
        int l0 = 0, l1 = L, tt0 = 0, tt1 = tiles;
        if (tiles >= nth) tt0 = (int)((int64_t)tiles * me / nth), tt1 = (int)((int64_t)tiles * (me + 1) / nth);
        else l0 = (int)((int64_t)L * me / nth), l1 = (int)((int64_t)L * (me + 1) / nth);
        uint8_t *xq = aligned_alloc(64, (size_t)SEL_TT * kp);
        for (int tt = tt0; tt < tt1; tt++) select_tile(&a, tt, l0, l1, xq);
        free(xq);
    }
}
#else
int has_select(void) { return 0; }

void nm_linear_select(const float *x, int64_t ldx, int T, int K, const uint8_t *sidx, const int8_t *sw,
                      const int32_t *sstart, const int32_t *wsum, int O, int G, int W, const float *scales,
                      const float *bias, float *y, int act, int threads) {
    /* without AVX2 the Python side never calls this (has_select() is 0); scalar for the record,
     * on either geometry */
    const int nb = (K + W - 1) / W, Q = sstart[nb];
    (void)threads;
    for (int t = 0; t < T; t++) {
        const float *xr = x + (int64_t)t * ldx;
        float st, inv;
        token_scales(x, ldx, t, 1, K, 127, &st, &inv, 1);
        for (int o = 0; o < O; o++) {
            int64_t acc = 0;
            int l = o / G, lane = o % G;
            for (int b = 0; b < nb; b++) {
                for (int q = sstart[b]; q < sstart[b + 1]; q++)
                    for (int i = 0; i < 4; i++) {
                        int64_t e = 4 * G * ((int64_t)Q * l + q) + 4 * lane + i;
                        int k = W * b + sidx[e];
                        int q = k < K ? (int)lrintf(xr[k] * inv) : 0;
                        acc += (int64_t)q * sw[e];
                    }
            }
            float v = (float)acc * scales[o] * st + (bias ? bias[o] : 0.0f);
            y[(int64_t)t * O + o] = act ? 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)) : v;
        }
    }
    (void)wsum;
}
#endif

#if defined(__AVX2__) && defined(__F16C__)
/* 8 lane values of slot e as fp32: vt 0 fp32, 1 fp16 (F16C), 2 int8 (the row scale comes later). */
static inline __attribute__((always_inline)) __m256 lane_values(const void *lvals, int64_t e, const int vt) {
    if (vt == 1) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)lvals + e)));
    if (vt == 2) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)lvals + e))));
    return _mm256_loadu_ps((const float *)lvals + e);
}

/* The N kept weights of group g for 8 rows: each row's input picked from the group's M inputs by
 * its position (vpermps: STA's operand multiplexer, in-register), alternating two accumulators. */
static inline __attribute__((always_inline)) void group_fma(
    const float *x, const void *lvals, const uint8_t *lpos, int64_t e, int g, int N, int M,
    __m256 *A, __m256 *B, const int vt, const int mode) {
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    if (mode < 2) lo = _mm256_loadu_ps(x + g * M);
    if (mode == 1) hi = _mm256_loadu_ps(x + g * M + 8);
    for (int s = 0; s < N; s++, e += 8) {
        __m256i sel = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(lpos + e)));
        __m256 xs;
        if (mode == 0) {
            xs = _mm256_permutevar8x32_ps(lo, sel);
        } else if (mode == 1) {
            __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(sel, _mm256_set1_epi32(7)));
            xs = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, sel), _mm256_permutevar8x32_ps(hi, sel), upper);
        } else {
            xs = _mm256_i32gather_ps(x, _mm256_add_epi32(_mm256_set1_epi32(g * M), sel), 4);
        }
        __m256 w = lane_values(lvals, e, vt);
        if (s & 1) *B = _mm256_fmadd_ps(w, xs, *B);
        else *A = _mm256_fmadd_ps(w, xs, *A);
    }
}

/* One octet of rows, groups four at a time into eight accumulators (8 independent FMA chains,
 * whatever N is: one chain would wait out the FMA latency on every kept weight). int8 values: the
 * sums are in units of each row's scale, applied once at the end. */
static inline __attribute__((always_inline)) void octet_body(
    const float *x, const void *lvals, const uint8_t *lpos, int q, int G, int N, int M,
    const float *bias, const float *scales, float *y, const int vt, const int mode) {
    int64_t e = (int64_t)q * G * N * 8, step = (int64_t)N * 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int g = 0;
    for (; g + 4 <= G; g += 4, e += 4 * step) {
        group_fma(x, lvals, lpos, e, g, N, M, &a0, &a1, vt, mode);
        group_fma(x, lvals, lpos, e + step, g + 1, N, M, &a2, &a3, vt, mode);
        group_fma(x, lvals, lpos, e + 2 * step, g + 2, N, M, &a4, &a5, vt, mode);
        group_fma(x, lvals, lpos, e + 3 * step, g + 3, N, M, &a6, &a7, vt, mode);
    }
    for (; g < G; g++, e += step) group_fma(x, lvals, lpos, e, g, N, M, &a0, &a1, vt, mode);
    __m256 acc = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                               _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    if (vt == 2) acc = _mm256_mul_ps(acc, _mm256_loadu_ps(scales + 8 * q));
    if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias + 8 * q));
    _mm256_storeu_ps(y + 8 * q, acc);
}
#endif

/* One token, one octet of rows: y[8q .. 8q+7]. Values fp32, fp16 (vt 1: half the bytes of a
 * memory-bound pass, converted in registers by F16C) or int8 (vt 2: a quarter, times the row's
 * scale; scales padded to the octets). */
static void octet(const float *x, const void *lvals, const uint8_t *lpos, int q, int G, int N, int M,
                  const float *bias, const float *scales, float *y, int vt) {
#if defined(__AVX2__) && defined(__F16C__)
    /* constant N = 1, 2 (the common sparse patterns) let the compiler unroll the slot loop */
#define BODY(VT, MODE) \
    do { \
        if (N == 1) octet_body(x, lvals, lpos, q, G, 1, M, bias, scales, y, VT, MODE); \
        else if (N == 2) octet_body(x, lvals, lpos, q, G, 2, M, bias, scales, y, VT, MODE); \
        else octet_body(x, lvals, lpos, q, G, N, M, bias, scales, y, VT, MODE); \
    } while (0)
#define MODES(VT) \
    do { \
        if (mode == 0) BODY(VT, 0); \
        else if (mode == 1) BODY(VT, 1); \
        else BODY(VT, 2); \
    } while (0)
    const int mode = M <= 8 ? 0 : (M <= 16 ? 1 : 2);
    if (vt == 1) MODES(1);
    else if (vt == 2) MODES(2);
    else MODES(0);
#undef MODES
#undef BODY
#else
    /* the Python side only asks for fp16 where F16C built */
    int64_t e = (int64_t)q * G * N * 8;
    float acc[8] = {0};
    for (int g = 0; g < G; g++)
        for (int s = 0; s < N; s++, e += 8)
            for (int l = 0; l < 8; l++) {
                float w = vt == 2 ? (float)((const int8_t *)lvals)[e + l] : ((const float *)lvals)[e + l];
                acc[l] += w * x[g * M + lpos[e + l]];
            }
    for (int l = 0; l < 8; l++)
        y[8 * q + l] = acc[l] * (vt == 2 ? scales[8 * q + l] : 1.0f) + (bias ? bias[8 * q + l] : 0.0f);
#endif
}

/* One token. x: K floats; y: O8 = 8 * octets floats (the padded rows' outputs are dropped by the
 * caller); bias: O floats or NULL; vt: lvals holds fp32 (0), fp16 (1) or int8 (2, with scales:
 * O8 floats). */
void nm_linear_vector(const float *x_in, const void *lvals, const uint8_t *lpos, int O, int O8, int K, int N,
                      int M, const float *bias_in, float *y, int vt, const float *scales, int threads) {
    const int G = K / M, Q = O8 / 8;
    /* the M-wide group loads read up to 16 floats past the last group: a zero-padded copy */
    float *x = aligned_alloc(64, sizeof(float) * (size_t)((K + 16 + 15) / 16 * 16));
    memcpy(x, x_in, sizeof(float) * K);
    memset(x + K, 0, sizeof(float) * 16);
    float *bias = NULL;
    if (bias_in) {
        bias = aligned_alloc(64, sizeof(float) * (size_t)((O8 + 15) / 16 * 16));
        memcpy(bias, bias_in, sizeof(float) * O);
        memset(bias + O, 0, sizeof(float) * (O8 - O));
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int q = 0; q < Q; q++) {
        octet(x, lvals, lpos, q, G, N, M, bias, scales, y, vt);
    }
    free(x);
    free(bias);
}

/* 1 when this build converts fp16 values in registers (F16C), else 0. */
int has_f16c(void) {
#if defined(__AVX2__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
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

/* ---- fused attention ------------------------------------------------------------------------ */


static float dot(const float *a, const float *b, int d) {
    int c = 0;
    float s = 0.0f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
    s = hsum256(acc);
#endif
    for (; c < d; c++) s += a[c] * b[c];
    return s;
}

#define ATT_BLOCK 64  /* keys per online-softmax step */

/* softmax(scale * Q K^T) V for one query row over a key range, with an online softmax: per block of
 * ATT_BLOCK keys the running max m and sum l are updated and the output accumulator rescaled by
 * exp(m_old - m_new). The row's raw scores are kept in srow (one row, not the matrix) so that, at the
 * end, the probabilities it gives each key can be added to received (SpAtten's token importance). */
static void attention_row(const float *qrow, const float *k, const float *v, int lk, int d, float scale,
                          int64_t qpos, const int64_t *kpos, float *srow, float *acc, float *orow,
                          double *received) {
    float m = -INFINITY, l = 0.0f;
    for (int c = 0; c < d; c++) acc[c] = 0.0f;
    for (int j0 = 0; j0 < lk; j0 += ATT_BLOCK) {
        int j1 = j0 + ATT_BLOCK < lk ? j0 + ATT_BLOCK : lk;
        float mb = -INFINITY;
        for (int j = j0; j < j1; j++) {
            float s = (kpos && kpos[j] > qpos) ? -INFINITY : scale * dot(qrow, k + (int64_t)j * d, d);
            srow[j] = s;
            mb = s > mb ? s : mb;
        }
        if (mb == -INFINITY) {                    /* every key of the block is masked */
            srow[lk + j0 / ATT_BLOCK] = -INFINITY;
            continue;
        }
        if (mb > m) {                              /* a new running max: rescale what we have */
            float corr = m == -INFINITY ? 0.0f : expf(m - mb);
            l *= corr;
            for (int c = 0; c < d; c++) acc[c] *= corr;
            m = mb;
        }
        int j = j0;
#if defined(__AVX2__)
        __m256 mv = _mm256_set1_ps(m);
        for (; j + 8 <= j1; j += 8) {
            __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(srow + j), mv));
            _mm256_storeu_ps(srow + j, p);         /* the row buffer now holds exp(s - m) */
        }
#endif
        for (; j < j1; j++) srow[j] = expf(srow[j] - m);
        for (j = j0; j < j1; j++) {
            float p = srow[j];
            if (p == 0.0f) continue;
            l += p;
            const float *vr = v + (int64_t)j * d;
            int c = 0;
#if defined(__AVX2__)
            __m256 pv = _mm256_set1_ps(p);
            for (; c + 8 <= d; c += 8)
                _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr + c), _mm256_loadu_ps(acc + c)));
#endif
            for (; c < d; c++) acc[c] += p * vr[c];
        }
        /* blocks before this one hold exp(s - m_then): keep a per-block max for the importance pass */
        srow[lk + j0 / ATT_BLOCK] = m;
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int c = 0; c < d; c++) orow[c] = acc[c] * inv;
    if (received) {  /* p_j = exp(s_j - m_block) * exp(m_block - m_final) / l */
        for (int j0 = 0, b = 0; j0 < lk; j0 += ATT_BLOCK, b++) {
            int j1 = j0 + ATT_BLOCK < lk ? j0 + ATT_BLOCK : lk;
            float mb = srow[lk + b];
            if (!(mb > -INFINITY)) continue;
            float f = expf(mb - m) * inv;
            for (int j = j0; j < j1; j++) received[j] += (double)(srow[j] * f);
        }
    }
}

/* q: (hq, lq, d), k, v: (hkv, lk, d) with rows contiguous and KV heads kv_stride rows apart (lk when the
 * tensors are contiguous; a cache's capacity when they are its first lk rows); query head h reads KV
 * head h / (hq / hkv).
 * qpos (lq) and kpos (lk): key j is visible to query i when kpos[j] <= qpos[i]; NULL: all visible.
 * out: (hq, lq, d). received (lk doubles, zeroed by the caller) or NULL. */
void attention_fused(const float *q, const float *k, const float *v, int hq, int hkv, int lq, int lk,
                     int64_t kv_stride, int d, float scale, const int64_t *qpos, const int64_t *kpos, float *out,
                     double *received, int threads) {
    const int group = hq / hkv, nblk = (lk + ATT_BLOCK - 1) / ATT_BLOCK;
    #pragma omp parallel num_threads(threads)
    {
        float *srow = malloc(sizeof(float) * (size_t)(lk + nblk + 8));
        float *acc = malloc(sizeof(float) * (size_t)(d + 8));
        double *mine = received ? calloc((size_t)lk, sizeof(double)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)hq * lq; r++) {
            int h = (int)(r / lq), i = (int)(r % lq), kh = h / group;
            attention_row(q + r * d, k + (int64_t)kh * kv_stride * d, v + (int64_t)kh * kv_stride * d, lk, d, scale,
                          qpos ? qpos[i] : 0, qpos ? kpos : NULL, srow, acc, out + r * d, mine);
        }
        if (received) {
            #pragma omp critical
            for (int j = 0; j < lk; j++) received[j] += mine[j];
        }
        free(srow);
        free(acc);
        free(mine);
    }
}

/* Many queries, no causal mask (an encoder's attention, a prompt against a cache it follows):
 * softmax(scale Q K^T + key bias) V a head at a time, QB query rows at a time, materialised row by
 * row (QB x Lk scores, 12 KiB at 512 keys), register-blocked like a GEMM: S from K transposed
 * (QB queries x 16 keys, 12 FMA chains), P V from V's rows (3 queries x 32 dimensions, 12 chains).
 * Layouts by element strides (batch, head, row), so HF's (B, H, L, d) views and its (B, L, H, d)
 * output are read and written in place: q[b * qs[0] + h * qs[1] + i * qs[2] + c], k / v likewise
 * (head h / group for grouped KV), out[b * os[0] + h * os[1] + i * os[2] + c]. key_bias: (B, Lk) added to the scores
 * (-inf: a padding key) or NULL. received: (Lk,) += the probabilities each key receives, summed
 * over heads and queries (SpAtten's importance; B = 1), or NULL. d a multiple of 8. */
#define ENC_QB 6

/* One score row in place: + key bias, exp(s - max) over the lk keys, 0 for the padding to lkp.
 * Returns 1 / sum (0 when every key is masked: a zero row; SDPA gives NaN there, HF never asks).
 * received: += the normalised row. */
static float softmax_row(float *row, int lk, int lkp, const float *bias, double *received) {
    int j = 0;
    float m = -INFINITY, l = 0.0f;
#ifdef __AVX512F__
    {   /* the max with four independent chains (one chain waits out vmaxps' latency every step) */
        __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
        for (; j + 64 <= lk; j += 64) {
            __m512 x0 = _mm512_load_ps(row + j), x1 = _mm512_load_ps(row + j + 16), x2 = _mm512_load_ps(row + j + 32),
                   x3 = _mm512_load_ps(row + j + 48);
            if (bias) {
                x0 = _mm512_add_ps(x0, _mm512_loadu_ps(bias + j)); x1 = _mm512_add_ps(x1, _mm512_loadu_ps(bias + j + 16));
                x2 = _mm512_add_ps(x2, _mm512_loadu_ps(bias + j + 32)); x3 = _mm512_add_ps(x3, _mm512_loadu_ps(bias + j + 48));
                _mm512_store_ps(row + j, x0); _mm512_store_ps(row + j + 16, x1);
                _mm512_store_ps(row + j + 32, x2); _mm512_store_ps(row + j + 48, x3);
            }
            m0 = _mm512_max_ps(m0, x0); m1 = _mm512_max_ps(m1, x1); m2 = _mm512_max_ps(m2, x2); m3 = _mm512_max_ps(m3, x3);
        }
        for (; j + 16 <= lk; j += 16) {
            __m512 x = _mm512_load_ps(row + j);
            if (bias) {
                x = _mm512_add_ps(x, _mm512_loadu_ps(bias + j));
                _mm512_store_ps(row + j, x);
            }
            m0 = _mm512_max_ps(m0, x);
        }
        m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    }
#endif
#ifdef __AVX2__
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= lk; j += 8) {
        __m256 x = _mm256_load_ps(row + j);
        if (bias) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + j));
        _mm256_store_ps(row + j, x);
        mv = _mm256_max_ps(mv, x);
    }
    float mm[8];
    _mm256_storeu_ps(mm, mv);
    for (int i = 0; i < 8; i++) m = mm[i] > m ? mm[i] : m;
#endif
    for (; j < lk; j++) {
        if (bias) row[j] += bias[j];
        m = row[j] > m ? row[j] : m;
    }
    if (m == -INFINITY) {
        for (j = 0; j < lkp; j++) row[j] = 0.0f;
        return 0.0f;
    }
    j = 0;
#ifdef __AVX512F__
    {   /* 16 keys a step on zmm (the row is 64-byte aligned: lkp a multiple of 16) */
        __m512 l16 = _mm512_setzero_ps();
        const __m512 m16 = _mm512_set1_ps(m);
        for (; j + 16 <= lk; j += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_load_ps(row + j), m16));
            _mm512_store_ps(row + j, e);
            l16 = _mm512_add_ps(l16, e);
        }
        l = _mm512_reduce_add_ps(l16);
    }
#endif
#ifdef __AVX2__
    __m256 lv = _mm256_setzero_ps();
    mv = _mm256_set1_ps(m);
    for (; j + 8 <= lk; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_load_ps(row + j), mv));
        _mm256_store_ps(row + j, e);
        lv = _mm256_add_ps(lv, e);
    }
    l += hsum256(lv);
#endif
    for (; j < lk; j++) { row[j] = expf(row[j] - m); l += row[j]; }
    for (; j < lkp; j++) row[j] = 0.0f;
    float inv = 1.0f / l;
    if (received)
        for (j = 0; j < lk; j++) received[j] += (double)(row[j] * inv);
    return inv;
}

/* sc[i * ldc + j] = scale q_i . k_j for ENC_QB query rows (qr) and 16 keys of kt (d rows, stride ldk). */
static inline __attribute__((always_inline)) void score_tile(const float *const *qr, const float *kt, int ldk, int d,
                                                             float scale, float *sc, int ldc, int nq) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0, e0 = a0, e1 = a0,
           f0 = a0, f1 = a0;
    const float *q0 = qr[0], *q1 = qr[1], *q2 = qr[2], *q3 = qr[3], *q4 = qr[4], *q5 = qr[5];
    for (int c = 0; c < d; c++) {
        __m256 k0 = _mm256_load_ps(kt + (int64_t)c * ldk), k1 = _mm256_load_ps(kt + (int64_t)c * ldk + 8), x;
        x = _mm256_broadcast_ss(q0 + c); a0 = _mm256_fmadd_ps(x, k0, a0); a1 = _mm256_fmadd_ps(x, k1, a1);
        x = _mm256_broadcast_ss(q1 + c); b0 = _mm256_fmadd_ps(x, k0, b0); b1 = _mm256_fmadd_ps(x, k1, b1);
        x = _mm256_broadcast_ss(q2 + c); c0 = _mm256_fmadd_ps(x, k0, c0); c1 = _mm256_fmadd_ps(x, k1, c1);
        x = _mm256_broadcast_ss(q3 + c); d0 = _mm256_fmadd_ps(x, k0, d0); d1 = _mm256_fmadd_ps(x, k1, d1);
        x = _mm256_broadcast_ss(q4 + c); e0 = _mm256_fmadd_ps(x, k0, e0); e1 = _mm256_fmadd_ps(x, k1, e1);
        x = _mm256_broadcast_ss(q5 + c); f0 = _mm256_fmadd_ps(x, k0, f0); f1 = _mm256_fmadd_ps(x, k1, f1);
    }
    const __m256 s = _mm256_set1_ps(scale);
    __m256 r[ENC_QB][2] = {{a0, a1}, {b0, b1}, {c0, c1}, {d0, d1}, {e0, e1}, {f0, f1}};
    for (int i = 0; i < nq; i++) {
        _mm256_store_ps(sc + i * ldc, _mm256_mul_ps(r[i][0], s));
        _mm256_store_ps(sc + i * ldc + 8, _mm256_mul_ps(r[i][1], s));
    }
#else
    for (int i = 0; i < nq; i++)
        for (int j = 0; j < 16; j++) {
            float a = 0.0f;
            for (int c = 0; c < d; c++) a += qr[i][c] * kt[(int64_t)c * ldk + j];
            sc[i * ldc + j] = a * scale;
        }
#endif
}

/* orow[i][c0 + c] = sum_j pr[i][j] v[j * ldv + c] for 3 query rows and nv x 8 dimensions (nv <= 4). */
static inline __attribute__((always_inline)) void pv_tile(const float *const *pr, const float *v, int64_t ldv, int lk,
                                                          int nv, float *const *orow, int c0, int n3, const float *inv) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0, c0v = a0, c1 = a0,
           c2 = a0, c3 = a0;
    const float *p0 = pr[0], *p1 = pr[1], *p2 = pr[2];
    if (nv == 4) {
        for (int j = 0; j < lk; j++) {
            const float *vr = v + j * ldv;
            __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8), v2 = _mm256_loadu_ps(vr + 16),
                   v3 = _mm256_loadu_ps(vr + 24), x;
            x = _mm256_broadcast_ss(p0 + j);
            a0 = _mm256_fmadd_ps(x, v0, a0); a1 = _mm256_fmadd_ps(x, v1, a1); a2 = _mm256_fmadd_ps(x, v2, a2); a3 = _mm256_fmadd_ps(x, v3, a3);
            x = _mm256_broadcast_ss(p1 + j);
            b0 = _mm256_fmadd_ps(x, v0, b0); b1 = _mm256_fmadd_ps(x, v1, b1); b2 = _mm256_fmadd_ps(x, v2, b2); b3 = _mm256_fmadd_ps(x, v3, b3);
            x = _mm256_broadcast_ss(p2 + j);
            c0v = _mm256_fmadd_ps(x, v0, c0v); c1 = _mm256_fmadd_ps(x, v1, c1); c2 = _mm256_fmadd_ps(x, v2, c2); c3 = _mm256_fmadd_ps(x, v3, c3);
        }
    } else {   /* 8, 16 or 24 dimensions left: the same with the unused vectors kept at zero */
        for (int j = 0; j < lk; j++) {
            const float *vr = v + j * ldv;
            __m256 x0 = _mm256_broadcast_ss(p0 + j), x1 = _mm256_broadcast_ss(p1 + j), x2 = _mm256_broadcast_ss(p2 + j);
            __m256 v0 = _mm256_loadu_ps(vr);
            a0 = _mm256_fmadd_ps(x0, v0, a0); b0 = _mm256_fmadd_ps(x1, v0, b0); c0v = _mm256_fmadd_ps(x2, v0, c0v);
            if (nv > 1) {
                __m256 v1 = _mm256_loadu_ps(vr + 8);
                a1 = _mm256_fmadd_ps(x0, v1, a1); b1 = _mm256_fmadd_ps(x1, v1, b1); c1 = _mm256_fmadd_ps(x2, v1, c1);
            }
            if (nv > 2) {
                __m256 v2 = _mm256_loadu_ps(vr + 16);
                a2 = _mm256_fmadd_ps(x0, v2, a2); b2 = _mm256_fmadd_ps(x1, v2, b2); c2 = _mm256_fmadd_ps(x2, v2, c2);
            }
        }
    }
    __m256 r[3][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}, {c0v, c1, c2, c3}};
    for (int i = 0; i < n3; i++)
        for (int u = 0; u < nv; u++) _mm256_storeu_ps(orow[i] + c0 + 8 * u, _mm256_mul_ps(r[i][u], _mm256_set1_ps(inv[i])));
#else
    for (int i = 0; i < n3; i++)
        for (int c = 0; c < 8 * nv; c++) {
            float a = 0.0f;
            for (int j = 0; j < lk; j++) a += pr[i][j] * v[j * ldv + c];
            orow[i][c0 + c] = a * inv[i];
        }
#endif
}

/* One key (or key pair) of a 6-query x 32-channel P V tile: query i's weight from its row p_i at
 * index J, broadcast by SET1, times the value vectors v0 and v1 into its sums by MAC(acc, x, v)
 * (fp32 FMA, vpdpwssd or vpmaddwd + vpaddd in the int8 attention). */
#define PV6_STEP(SET1, MAC, J)                                                                  \
    x = SET1(p0[J]); a0 = MAC(a0, x, v0); a1 = MAC(a1, x, v1);                                  \
    x = SET1(p1[J]); b0 = MAC(b0, x, v0); b1 = MAC(b1, x, v1);                                  \
    x = SET1(p2[J]); c0v = MAC(c0v, x, v0); c1 = MAC(c1, x, v1);                                \
    x = SET1(p3[J]); d0 = MAC(d0, x, v0); d1 = MAC(d1, x, v1);                                  \
    x = SET1(p4[J]); e0 = MAC(e0, x, v0); e1 = MAC(e1, x, v1);                                  \
    x = SET1(p5[J]); f0 = MAC(f0, x, v0); f1 = MAC(f1, x, v1)
#if defined(__AVX512F__)
#define ENC_ZMM 1
#define FMA_ACC(acc, x, v) _mm512_fmadd_ps(x, v, acc)
/* The same tiles on zmm registers (AVX-512: 16 floats a register, two FMA ports on the Xeons that
 * have it): scores for ENC_QB queries x 32 keys (two tiles of 16), 12 independent sums. */
static inline __attribute__((always_inline)) void score_tile2(const float *const *qr, const float *kt, int ldk, int d,
                                                              float scale, float *sc, int ldc, int nq) {
    __m512 acc[ENC_QB][2];
    _Pragma("GCC unroll 8") for (int i = 0; i < ENC_QB; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int c = 0; c < d; c++) {
        __m512 k0 = _mm512_load_ps(kt + (int64_t)c * ldk), k1 = _mm512_load_ps(kt + (int64_t)c * ldk + 16);
        _Pragma("GCC unroll 8") for (int i = 0; i < ENC_QB; i++) {
            __m512 x = _mm512_set1_ps(qr[i][c]);
            acc[i][0] = _mm512_fmadd_ps(x, k0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(x, k1, acc[i][1]);
        }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int i = 0; i < nq; i++) {
        _mm512_store_ps(sc + i * ldc, _mm512_mul_ps(acc[i][0], s));
        _mm512_store_ps(sc + i * ldc + 16, _mm512_mul_ps(acc[i][1], s));
    }
}

/* orow[i][c0 + c] = inv_i sum_j pr[i][j] v[j * ldv + c0 + c] for ENC_QB query rows and the next
 * 8, 16, 24 or 32 dimensions (masked loads and stores below 32). */
static inline __attribute__((always_inline)) void pv_tile6(const float *const *pr, const float *v, int64_t ldv, int lk,
                                                           int nd, float *const *orow, int c0, int n6, const float *inv) {
    const __mmask16 m0 = nd >= 16 ? 0xffff : (__mmask16)((1u << nd) - 1),
                    m1 = nd > 16 ? (__mmask16)((1u << (nd - 16)) - 1) : 0;
    /* named accumulators: in an array gcc kept them on the stack, a store and a load each step */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0v = a0, c1 = a0, d0 = a0, d1 = a0, e0 = a0, e1 = a0,
           f0 = a0, f1 = a0;
    const float *p0 = pr[0], *p1 = pr[1], *p2 = pr[2], *p3 = pr[3], *p4 = pr[4], *p5 = pr[5];
    for (int j = 0; j < lk; j++) {
        const float *vr = v + j * ldv;
        const __m512 v0 = _mm512_maskz_loadu_ps(m0, vr), v1 = _mm512_maskz_loadu_ps(m1, vr + 16);
        __m512 x;
        PV6_STEP(_mm512_set1_ps, FMA_ACC, j);
    }
    const __m512 r[ENC_QB][2] = {{a0, a1}, {b0, b1}, {c0v, c1}, {d0, d1}, {e0, e1}, {f0, f1}};
    for (int i = 0; i < n6; i++) {
        const __m512 w = _mm512_set1_ps(inv[i]);
        _mm512_mask_storeu_ps(orow[i] + c0, m0, _mm512_mul_ps(r[i][0], w));
        _mm512_mask_storeu_ps(orow[i] + c0 + 16, m1, _mm512_mul_ps(r[i][1], w));
    }
}
#else
#define ENC_ZMM 0
#endif

/* ---- int8 attention (bits 8 of attention_encoder): SpAtten's low-bit Q, K, V, STA's fixed point --
 * K: per key symmetric int8 (scale sk_j), 4 dimensions x 16 keys a 64-byte block (kq as int32:
 * kq[(c / 4) lkp + j] holds k8_j,c..c+3); Q: per query symmetric int8, held as u8 = q8 + 128, so
 * the scores, in base 2 (log2 e folded into the key scales) with the key bias b_j:
 *   s_ij = log2(e) (scale sq_i sk_j (sum_c (q8_ic + 128) k8_jc - 128 sum_c k8_jc) + b_j)   (vpdpbusd: u8 x s8)
 * P: p_ij = round(16383 * 2^(s_ij - max_i s_i)), 14-bit integers (2^x: a degree-4 polynomial and
 * vscalefps); V: per channel (a column over the keys) symmetric int8, 2 keys x 16 channels as
 * int16 pairs (vq as int32: vq[(j / 2) d + c] holds v8_2m,c low, v8_2m+1,c high):
 *   o_ic = sv_c sum_j p_ij v8_jc / sum_j p_ij                              (vpdpwssd: s16 x s16)
 * int32 sums: Q K^T < 255 * 127 * d (d <= 128: < 2^22); P V < 16383 * 127 * 1024 < 2^31 for a chunk
 * of 1024 keys (longer rows add chunk by chunk in fp32). Builds without AVX-512 VNNI compute the
 * same integers on AVX2 (Q K^T: vpmaddubsw with the sign moved onto q, then vpmaddwd by ones; P V:
 * vpmaddwd + vpaddd for vpdpwssd; 2^n by the exponent bits, exact here) or in scalar code. */
#define P_ONE 16383
#define PV_CHUNK 1024
#define LOG2E 1.44269504088896341f
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ATT_VNNI 1
#else
#define ATT_VNNI 0
#endif
#if !ATT_VNNI && defined(__AVX2__) && defined(__FMA__)
#define ATT_AVX2 1   /* the same integers on ymm (see below) */
#else
#define ATT_AVX2 0
#endif
/* 16383 * 2^f on |f| <= 1/2: 16383 (1 + c1 f + c2 f^2 + c3 f^3 + c4 f^4), least squares in the
 * relative error (3.1e-6, 0.06 of the last integer step) */
#define EXP2_C1 (16383.0f * 0.69312198470f)
#define EXP2_C2 (16383.0f * 0.24023718625f)
#define EXP2_C3 (16383.0f * 0.05591697746f)
#define EXP2_C4 (16383.0f * 0.00960040924f)

typedef struct {
    int32_t *kq, *kcorr, *vq, *qw;   /* qw: ENC_QB query rows of d u8, read 4 at a time */
    float *ks, *kbias, *sv, *sq, *tmp;   /* tmp: 3 d scratch */
    int16_t *pq;                     /* ENC_QB rows of lkp probabilities */
} QuantHead;

static QuantHead quant_head_alloc(int d, int lkp) {
    QuantHead w;
    w.kq = aligned_alloc(64, (size_t)d * lkp);
    w.kcorr = aligned_alloc(64, sizeof(int32_t) * (size_t)lkp);
    w.ks = aligned_alloc(64, sizeof(float) * (size_t)lkp);
    w.kbias = aligned_alloc(64, sizeof(float) * (size_t)lkp);
    w.vq = aligned_alloc(64, sizeof(int16_t) * (size_t)d * lkp + 128);
    w.sv = aligned_alloc(64, sizeof(float) * (size_t)(d + 32));
    w.qw = aligned_alloc(64, (size_t)ENC_QB * d + 64);
    w.sq = aligned_alloc(64, sizeof(float) * 64);
    w.tmp = aligned_alloc(64, sizeof(float) * (size_t)(3 * d + 32));
    w.pq = aligned_alloc(64, sizeof(int16_t) * (size_t)ENC_QB * lkp);
    return w;
}

static void quant_head_free(QuantHead *w) {
    free(w->kq); free(w->kcorr); free(w->ks); free(w->kbias); free(w->vq); free(w->sv); free(w->qw); free(w->sq);
    free(w->tmp); free(w->pq);
}

/* q[i] = round(x[i] * s[i]) (nearest, ties to even: lrintf's rounding) for n floats; s[i] = s[0]
 * for every i when step is 0. */
static inline void round_scaled(const float *x, const float *s, int step, int n, int32_t *q) {
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_si512(q + i, _mm512_cvtps_epi32(_mm512_mul_ps(
            _mm512_loadu_ps(x + i), step ? _mm512_loadu_ps(s + i) : _mm512_set1_ps(s[0]))));
#endif
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_cvtps_epi32(_mm256_mul_ps(
            _mm256_loadu_ps(x + i), step ? _mm256_loadu_ps(s + i) : _mm256_set1_ps(s[0]))));
#endif
    for (; i < n; i++) q[i] = (int32_t)lrintf(x[i] * s[step ? i : 0]);
}

/* A row of d floats as bytes round(x / s) + off (s = max |x| / 127, into *scale); returns the sum
 * of the round(x / s). Zmm where d is a multiple of 16, else token_scales and one ymm pass (d a
 * multiple of 8) or round_scaled: the same scale, the same integers. */
static inline __attribute__((always_inline)) int32_t quant_row(const float *x, int d, int off, uint8_t *out, float *scale, int32_t *tmp) {
    int32_t sum = 0;
#ifdef __AVX512F__
    if (d % 16 == 0) {
        __m512 m = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
        const float mx = _mm512_reduce_max_ps(m);
        *scale = mx > 0.0f ? mx / 127.0f : 0.0f;
        const __m512 inv = _mm512_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
        __m512i s = _mm512_setzero_si512();
        for (int c = 0; c < d; c += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), inv));
            s = _mm512_add_epi32(s, q);
            _mm_storeu_si128((__m128i *)(out + c), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(off))));
        }
        return _mm512_reduce_add_epi32(s);
    }
#endif
    float inv;
    token_scales(x, 0, 0, 1, d, 127, scale, &inv, 1);
#ifdef __AVX2__
    if (d % 8 == 0) {   /* round, pack to bytes and sum in one pass on ymm: the same integers */
        const __m256 iv = _mm256_set1_ps(inv);
        __m256i s = _mm256_setzero_si256();
        for (int c = 0; c < d; c += 8) {
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c), iv));
            s = _mm256_add_epi32(s, q);
            const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(out + c), _mm_add_epi8(_mm_packs_epi16(h, h), _mm_set1_epi8((char)off)));   /* q + off mod 256 */
        }
        int32_t sv[8];
        _mm256_storeu_si256((__m256i *)sv, s);
        for (int k = 0; k < 8; k++) sum += sv[k];
        return sum;
    }
#endif
    round_scaled(x, &inv, 0, d, tmp);
    for (int c = 0; c < d; c++) {
        out[c] = (uint8_t)(tmp[c] + off);
        sum += tmp[c];
    }
    return sum;
}

/* One head's K (lk rows, stride ki) and V (stride vi) quantised into w, and its key bias (log2 e
 * times bias, or 0; the padding keys lk..lkp -inf). */
static void quant_kv(const float *kb, int64_t ki, const float *vb, int64_t vi, const float *bias, int lk, int lkp,
                     int d, float scale, QuantHead *w) {
    int32_t *q = (int32_t *)(w->tmp + d), *q2 = q + d;   /* scratch */
    uint8_t *row = (uint8_t *)q2;
    for (int j = 0; j < lkp; j++) {
        float sk = 0.0f;
        const int32_t sum = j < lk ? quant_row(kb + j * ki, d, 0, row, &sk, q) : 0;
        if (j >= lk) memset(row, 0, (size_t)d);
        for (int c4 = 0; c4 < d / 4; c4++) memcpy(w->kq + (int64_t)c4 * lkp + j, row + 4 * c4, 4);
        w->kcorr[j] = 128 * sum;
        w->ks[j] = sk * scale * LOG2E;
        w->kbias[j] = j < lk ? (bias ? bias[j] * LOG2E : 0.0f) : -INFINITY;
    }
    float *ic = w->tmp;   /* per channel: max |v|, then 127 / max */
    for (int c = 0; c < d; c++) ic[c] = 0.0f;
    for (int j = 0; j < lk; j++)
        for (int c = 0; c < d; c++) ic[c] = fabsf(vb[j * vi + c]) > ic[c] ? fabsf(vb[j * vi + c]) : ic[c];
    for (int c = 0; c < d; c++) {
        w->sv[c] = ic[c] / 127.0f;
        ic[c] = ic[c] > 0.0f ? 127.0f / ic[c] : 0.0f;
    }
    for (int m = 0; m < lkp / 2; m++) {
        const int j = 2 * m;
        if (j < lk) round_scaled(vb + j * vi, ic, 1, d, q); else memset(q, 0, sizeof(int32_t) * d);
        if (j + 1 < lk) round_scaled(vb + (j + 1) * vi, ic, 1, d, q2); else memset(q2, 0, sizeof(int32_t) * d);
        for (int c = 0; c < d; c++) w->vq[(int64_t)m * d + c] = (int32_t)(((uint32_t)q2[c] << 16) | ((uint32_t)q[c] & 0xffffu));
    }
}

/* ENC_QB query rows (qr) as u8 = round(q / sq) + 128, sq = max |q| / 127. */
static void quant_queries(const float *const *qr, int d, QuantHead *w) {
    for (int i = 0; i < ENC_QB; i++) quant_row(qr[i], d, 128, (uint8_t *)w->qw + i * d, w->sq + i, (int32_t *)w->tmp);
}

/* Base-2 scores of the ENC_QB quantised queries against the lkp keys into sc (ENC_QB rows of lkp),
 * each row's max into mx. */
static void quant_scores(const QuantHead *w, int lkp, int d, float *sc, float *mx) {
#if ATT_VNNI
    const int d4 = d / 4;
    const int32_t *q0 = w->qw, *q1 = q0 + d4, *q2 = q1 + d4, *q3 = q2 + d4, *q4 = q3 + d4, *q5 = q4 + d4;
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0, m4 = m0, m5 = m0;
    const __m512 s0 = _mm512_set1_ps(w->sq[0]), s1 = _mm512_set1_ps(w->sq[1]), s2 = _mm512_set1_ps(w->sq[2]),
                 s3 = _mm512_set1_ps(w->sq[3]), s4 = _mm512_set1_ps(w->sq[4]), s5 = _mm512_set1_ps(w->sq[5]);
    for (int j0 = 0; j0 < lkp; j0 += 16) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
        for (int c4 = 0; c4 < d4; c4++) {
            const __m512i kv = _mm512_load_si512(w->kq + (int64_t)c4 * lkp + j0);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(q0[c4]), kv);
            a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(q1[c4]), kv);
            a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(q2[c4]), kv);
            a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(q3[c4]), kv);
            a4 = _mm512_dpbusd_epi32(a4, _mm512_set1_epi32(q4[c4]), kv);
            a5 = _mm512_dpbusd_epi32(a5, _mm512_set1_epi32(q5[c4]), kv);
        }
        const __m512i corr = _mm512_load_si512(w->kcorr + j0);
        const __m512 ks = _mm512_load_ps(w->ks + j0), kb = _mm512_load_ps(w->kbias + j0);
#define QSCORE(I, A, S, M)                                                                                      \
        do {                                                                                                    \
            const __m512 s = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(A, corr)), ks), S, kb); \
            _mm512_store_ps(sc + (int64_t)(I) * lkp + j0, s);                                                   \
            M = _mm512_max_ps(M, s);                                                                            \
        } while (0)
        QSCORE(0, a0, s0, m0); QSCORE(1, a1, s1, m1); QSCORE(2, a2, s2, m2);
        QSCORE(3, a3, s3, m3); QSCORE(4, a4, s4, m4); QSCORE(5, a5, s5, m5);
#undef QSCORE
    }
    mx[0] = _mm512_reduce_max_ps(m0); mx[1] = _mm512_reduce_max_ps(m1); mx[2] = _mm512_reduce_max_ps(m2);
    mx[3] = _mm512_reduce_max_ps(m3); mx[4] = _mm512_reduce_max_ps(m4); mx[5] = _mm512_reduce_max_ps(m5);
#elif ATT_AVX2
    /* vpmaddubsw on |k8| (unsigned) and q8 signed as k8: pairs of products of at most 2 x 127 x 127,
     * exact in int16; vpmaddwd by ones widens them to int32: sum_c q8 k8 exactly (vpdpbusd's sum
     * less the 128 sum k8 it adds). The queries are held as q8 + 128: x ^ 0x80 gives q8 back. */
    const int d4 = d / 4;
    int32_t *qw = (int32_t *)w->tmp;   /* the signed queries: broadcast from memory in the loop */
    for (int i = 0; i < ENC_QB * d4; i++) qw[i] = w->qw[i] ^ (int32_t)0x80808080u;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int j0 = 0; j0 < lkp; j0 += 8) {
        __m256i a[ENC_QB];
        for (int i = 0; i < ENC_QB; i++) a[i] = _mm256_setzero_si256();
        for (int c4 = 0; c4 < d4; c4++) {
            const __m256i kv = _mm256_load_si256((const __m256i *)(w->kq + (int64_t)c4 * lkp + j0)), ak = _mm256_abs_epi8(kv);
            _Pragma("GCC unroll 6") for (int i = 0; i < ENC_QB; i++)
                a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(ak, _mm256_sign_epi8(
                    _mm256_set1_epi32(qw[i * d4 + c4]), kv)), ones));
        }
        const __m256 ks = _mm256_load_ps(w->ks + j0), kb = _mm256_load_ps(w->kbias + j0);
        for (int i = 0; i < ENC_QB; i++)
            _mm256_store_ps(sc + (int64_t)i * lkp + j0, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[i]), ks),
                                                                       _mm256_set1_ps(w->sq[i]), kb));
    }
    for (int i = 0; i < ENC_QB; i++) {
        const float *row = sc + (int64_t)i * lkp;
        __m256 m8 = _mm256_set1_ps(-INFINITY);
        for (int j0 = 0; j0 < lkp; j0 += 8) m8 = _mm256_max_ps(m8, _mm256_load_ps(row + j0));
        float m[8];
        _mm256_storeu_ps(m, m8);
        mx[i] = m[0];
        for (int k = 1; k < 8; k++) mx[i] = m[k] > mx[i] ? m[k] : mx[i];
    }
#else
    const uint8_t *qu = (const uint8_t *)w->qw;
    const int8_t *kq = (const int8_t *)w->kq;
    for (int i = 0; i < ENC_QB; i++) {
        mx[i] = -INFINITY;
        for (int j = 0; j < lkp; j++) {
            int32_t a = 0;
            for (int c = 0; c < d; c++) a += (int32_t)qu[i * d + c] * kq[(int64_t)(c / 4) * 4 * lkp + 4 * j + c % 4];
            const float s = fmaf((float)(a - w->kcorr[j]) * w->ks[j], w->sq[i], w->kbias[j]);
            sc[(int64_t)i * lkp + j] = s;
            mx[i] = s > mx[i] ? s : mx[i];
        }
    }
#endif
}

/* p[j] = round(16383 * 2^(row[j] - m)) for the lkp scores of a row (0 below 2^-32, and for every
 * key when all are masked: m = -inf); returns sum_j p[j]. */
static int32_t quant_exp_row(const float *row, int lkp, float m, int16_t *p) {
    if (m == -INFINITY) {
        memset(p, 0, sizeof(int16_t) * lkp);
        return 0;
    }
    int j = 0;
    int32_t sum = 0;
#ifdef __AVX512F__
    const __m512 mv = _mm512_set1_ps(m), lo = _mm512_set1_ps(-32.0f);
    __m512i s16 = _mm512_setzero_si512();
    for (; j + 16 <= lkp; j += 16) {
        const __m512 y = _mm512_max_ps(_mm512_sub_ps(_mm512_load_ps(row + j), mv), lo);
        const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(y, n);
        __m512 e = _mm512_fmadd_ps(f, _mm512_set1_ps(EXP2_C4), _mm512_set1_ps(EXP2_C3));
        e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(EXP2_C2));
        e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(EXP2_C1));
        e = _mm512_fmadd_ps(e, f, _mm512_set1_ps((float)P_ONE));
        const __m512i pi = _mm512_cvtps_epi32(_mm512_scalef_ps(e, n));
        _mm256_store_si256((__m256i *)(p + j), _mm512_cvtepi32_epi16(pi));
        s16 = _mm512_add_epi32(s16, pi);
    }
    sum = _mm512_reduce_add_epi32(s16);
#elif ATT_AVX2
    const __m256 mv = _mm256_set1_ps(m), lo = _mm256_set1_ps(-32.0f);
    __m256i s8 = _mm256_setzero_si256();
    for (; j + 8 <= lkp; j += 8) {
        const __m256 y = _mm256_max_ps(_mm256_sub_ps(_mm256_load_ps(row + j), mv), lo);
        const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm256_sub_ps(y, n);
        __m256 e = _mm256_fmadd_ps(f, _mm256_set1_ps(EXP2_C4), _mm256_set1_ps(EXP2_C3));
        e = _mm256_fmadd_ps(e, f, _mm256_set1_ps(EXP2_C2));
        e = _mm256_fmadd_ps(e, f, _mm256_set1_ps(EXP2_C1));
        e = _mm256_fmadd_ps(e, f, _mm256_set1_ps((float)P_ONE));
        /* 2^n for n in [-32, 0] by its exponent bits: e 2^n is exact, as ldexpf's */
        const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                                      _mm256_set1_epi32(127)), 23));
        const __m256i pi = _mm256_cvtps_epi32(_mm256_mul_ps(e, two_n));
        _mm_storeu_si128((__m128i *)(p + j), _mm_packs_epi32(_mm256_castsi256_si128(pi), _mm256_extracti128_si256(pi, 1)));
        s8 = _mm256_add_epi32(s8, pi);
    }
    int32_t s8v[8];
    _mm256_storeu_si256((__m256i *)s8v, s8);
    for (int k = 0; k < 8; k++) sum += s8v[k];
#endif
    for (; j < lkp; j++) {
        float y = row[j] - m;
        y = y > -32.0f ? y : -32.0f;
        const float n = nearbyintf(y), f = y - n;
        float e = fmaf(f, EXP2_C4, EXP2_C3);
        e = fmaf(e, f, EXP2_C2);
        e = fmaf(e, f, EXP2_C1);
        e = fmaf(e, f, (float)P_ONE);
        p[j] = (int16_t)lrintf(ldexpf(e, (int)n));
        sum += p[j];
    }
    return sum;
}

/* orow[i][c] = inv_i sv_c sum_j p_ij v8_jc for the nq queries' probabilities. */
static void quant_pv(const QuantHead *w, int lkp, int d, int nq, const float *inv, float *const *orow) {
    for (int j0 = 0; j0 < lkp; j0 += PV_CHUNK) {
        const int m0 = j0 / 2, m1 = (j0 + PV_CHUNK < lkp ? j0 + PV_CHUNK : lkp) / 2;
#if ATT_VNNI
        const int32_t *p0 = (const int32_t *)w->pq, *p1 = p0 + lkp / 2, *p2 = p1 + lkp / 2, *p3 = p2 + lkp / 2,
                      *p4 = p3 + lkp / 2, *p5 = p4 + lkp / 2;
        for (int c0 = 0; c0 < d; c0 += 32) {
            const int nd = d - c0 < 32 ? d - c0 : 32;
            const __mmask16 k0 = nd >= 16 ? 0xffff : (__mmask16)((1u << nd) - 1),
                            k1 = nd > 16 ? (__mmask16)((1u << (nd - 16)) - 1) : 0;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0, c0v = a0, c1 = a0, d0 = a0, d1 = a0,
                    e0 = a0, e1 = a0, f0 = a0, f1 = a0;
            for (int m = m0; m < m1; m++) {
                const int32_t *vr = w->vq + (int64_t)m * d + c0;
                const __m512i v0 = _mm512_maskz_loadu_epi32(k0, vr), v1 = _mm512_maskz_loadu_epi32(k1, vr + 16);
                __m512i x;
                PV6_STEP(_mm512_set1_epi32, _mm512_dpwssd_epi32, m);
            }
            const __m512i r[ENC_QB][2] = {{a0, a1}, {b0, b1}, {c0v, c1}, {d0, d1}, {e0, e1}, {f0, f1}};
            const __m512 s0 = _mm512_maskz_loadu_ps(k0, w->sv + c0), s1 = _mm512_maskz_loadu_ps(k1, w->sv + c0 + 16);
            for (int i = 0; i < nq; i++) {
                const __m512 iv = _mm512_set1_ps(inv[i]);
                __m512 o0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(r[i][0]), s0), iv),
                       o1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(r[i][1]), s1), iv);
                if (j0) {
                    o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(k0, orow[i] + c0));
                    o1 = _mm512_add_ps(o1, _mm512_maskz_loadu_ps(k1, orow[i] + c0 + 16));
                }
                _mm512_mask_storeu_ps(orow[i] + c0, k0, o0);
                _mm512_mask_storeu_ps(orow[i] + c0 + 16, k1, o1);
            }
        }
#elif ATT_AVX2
        const int32_t *p0 = (const int32_t *)w->pq, *p1 = p0 + lkp / 2, *p2 = p1 + lkp / 2, *p3 = p2 + lkp / 2,
                      *p4 = p3 + lkp / 2, *p5 = p4 + lkp / 2;
        for (int c0 = 0; c0 < d; c0 += 16) {   /* 6 queries x 16 channels: 12 sums in registers */
            const int nd = d - c0 < 16 ? d - c0 : 16;
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            const __m256i k0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nd), lane),
                          k1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nd - 8), lane);
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0, c0v = a0, c1 = a0, d0 = a0, d1 = a0,
                    e0 = a0, e1 = a0, f0 = a0, f1 = a0;
#define MADD_ACC(acc, x, v) _mm256_add_epi32(acc, _mm256_madd_epi16(x, v))
            for (int m = m0; m < m1; m++) {
                const int32_t *vr = w->vq + (int64_t)m * d + c0;
                /* whole vectors: channels past nd read the next row (or vq's 128 bytes of slack)
                 * into sums that are never stored; no mask registers in the loop */
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)vr), v1 = _mm256_loadu_si256((const __m256i *)(vr + 8));
                __m256i x;
                PV6_STEP(_mm256_set1_epi32, MADD_ACC, m);
            }
#undef MADD_ACC
            const __m256i r[ENC_QB][2] = {{a0, a1}, {b0, b1}, {c0v, c1}, {d0, d1}, {e0, e1}, {f0, f1}};
            const __m256 s0 = _mm256_maskload_ps(w->sv + c0, k0), s1 = _mm256_maskload_ps(w->sv + c0 + 8, k1);
            for (int i = 0; i < nq; i++) {
                const __m256 iv = _mm256_set1_ps(inv[i]);
                __m256 o0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(r[i][0]), s0), iv),
                       o1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(r[i][1]), s1), iv);
                if (j0) {
                    o0 = _mm256_add_ps(o0, _mm256_maskload_ps(orow[i] + c0, k0));
                    o1 = _mm256_add_ps(o1, _mm256_maskload_ps(orow[i] + c0 + 8, k1));
                }
                _mm256_maskstore_ps(orow[i] + c0, k0, o0);
                _mm256_maskstore_ps(orow[i] + c0 + 8, k1, o1);
            }
        }
#else
        for (int i = 0; i < nq; i++)
            for (int c = 0; c < d; c++) {
                int32_t a = 0;
                for (int m = m0; m < m1; m++) {
                    const int32_t pv = w->vq[(int64_t)m * d + c];
                    a += (int32_t)w->pq[(int64_t)i * lkp + 2 * m] * (int16_t)(pv & 0xffff)
                         + (int32_t)w->pq[(int64_t)i * lkp + 2 * m + 1] * (int16_t)(pv >> 16);
                }
                const float o = ((float)a * w->sv[c]) * inv[i];
                orow[i][c] = j0 ? orow[i][c] + o : o;
            }
#endif
    }
}

/* One head of attention_encoder at bits 8 (see above), ENC_QB queries at a time; received +=
 * the probabilities (p_ij / sum_j p_ij) each key gets. */
static void quant_head(const float *qb, int64_t qi, const float *kb, int64_t ki, const float *vb, int64_t vi, int lq,
                       int lk, int lkp, int d, float scale, const float *bias, float *ob, int64_t oi, double *received,
                       float *sc, QuantHead *w) {
    quant_kv(kb, ki, vb, vi, bias, lk, lkp, d, scale, w);
    for (int i0 = 0; i0 < lq; i0 += ENC_QB) {
        const int nq = lq - i0 < ENC_QB ? lq - i0 : ENC_QB;
        const float *qr[ENC_QB];
        float *orow[ENC_QB], inv[ENC_QB], mx[ENC_QB];
        for (int i = 0; i < ENC_QB; i++) {   /* rows nq.. repeat the first: computed, never stored */
            qr[i] = qb + (int64_t)(i0 + (i < nq ? i : 0)) * qi;
            orow[i] = ob + (int64_t)(i0 + (i < nq ? i : 0)) * oi;
        }
        quant_queries(qr, d, w);
        quant_scores(w, lkp, d, sc, mx);
        for (int i = 0; i < ENC_QB; i++) {
            int16_t *p = w->pq + (int64_t)i * lkp;
            const int32_t sum = quant_exp_row(sc + (int64_t)i * lkp, lkp, mx[i], p);
            inv[i] = sum ? 1.0f / (float)sum : 0.0f;
            if (received && i < nq && sum)
                for (int j = 0; j < lk; j++) received[j] += (double)p[j] / sum;
        }
        quant_pv(w, lkp, d, nq, inv, orow);
    }
}

/* attention_encoder's operands: layouts by element strides (batch, head, row) */
typedef struct {
    const float *q, *k, *v; int H, group, lq, lk, d;
    int64_t qs[3], ks[3], vs[3], os[3];
    float scale; const float *key_bias; float *out; int bits;
} AttArgs;

/* A thread's scratch for attention heads of lk keys (lkp padded): K transposed and the score rows
 * (fp32), the quantised head (bits 8); allocated on first use. */
typedef struct { float *kt, *sc; QuantHead w; int ready; } AttScratch;

static void att_scratch_init(AttScratch *s, int d, int lkp, int bits) {
    if (s->ready) return;
    s->kt = bits == 8 ? NULL : aligned_alloc(64, sizeof(float) * (size_t)d * lkp);   /* int8: K is quantised, not transposed */
    s->sc = aligned_alloc(64, sizeof(float) * (size_t)ENC_QB * lkp);
    if (bits == 8) s->w = quant_head_alloc(d, lkp);
    s->ready = 1 + (bits == 8);
}

static void att_scratch_free(AttScratch *s) {
    if (!s->ready) return;
    free(s->kt); free(s->sc);
    if (s->ready == 2) quant_head_free(&s->w);
    s->ready = 0;
}

/* Head bh (= batch row * H + head) of attention_encoder; received (lk) += its probabilities, or NULL. */
static void encoder_head(const AttArgs *a, int64_t bh, AttScratch *s, double *received) {
    const int H = a->H, lq = a->lq, lk = a->lk, d = a->d, lkp = (lk + 15) / 16 * 16;
    const int64_t *qs = a->qs, *ks = a->ks, *vs = a->vs, *os = a->os;
    const int b = (int)(bh / H), h = (int)(bh % H), kh = h / a->group;
    const float *kb = a->k + b * ks[0] + kh * ks[1], *vb = a->v + b * vs[0] + kh * vs[1];
    const float *qb = a->q + b * qs[0] + h * qs[1];
    const float *bias = a->key_bias ? a->key_bias + (int64_t)b * lk : NULL;
    float *out = a->out, *kt, *sc;
    const float scale = a->scale;
    att_scratch_init(s, d, lkp, a->bits);
    kt = s->kt; sc = s->sc;
    if (a->bits == 8) {
        quant_head(qb, qs[2], kb, ks[2], vb, vs[2], lq, lk, lkp, d, scale, bias, out + b * os[0] + h * os[1], os[2],
                   received, sc, &s->w);
        return;
    }
    transpose(kb, ks[2], kt, lkp, lk, d);   /* K transposed: kt[c * lkp + j], padding keys zero */
    for (int c = 0; c < d; c++)
        for (int j = lk; j < lkp; j++) kt[(int64_t)c * lkp + j] = 0.0f;
    for (int i0 = 0; i0 < lq; i0 += ENC_QB) {
        const int nq = lq - i0 < ENC_QB ? lq - i0 : ENC_QB;
        /* scores: sc[i * lkp + j] = scale q_i . k_j + bias_j */
        const float *qr[ENC_QB];
        for (int i = 0; i < ENC_QB; i++) qr[i] = qb + (int64_t)(i0 + (i < nq ? i : 0)) * qs[2];
        int j0 = 0;
#if ENC_ZMM
        for (; j0 + 32 <= lkp; j0 += 32) score_tile2(qr, kt + j0, lkp, d, scale, sc + j0, lkp, nq);
#endif
        for (; j0 < lkp; j0 += 16) score_tile(qr, kt + j0, lkp, d, scale, sc + j0, lkp, nq);
        /* softmax a row: exp(s - max) (normalised by 1 / sum at the end, or here for received) */
        float inv[ENC_QB];
        for (int i = 0; i < nq; i++) inv[i] = softmax_row(sc + i * lkp, lk, lkp, bias, received);
        /* out_i = sum_j p_ij v_j: 3 queries x 32 dimensions at a time (6 on zmm) */
#if ENC_ZMM
        {
            const float *pr[ENC_QB];
            float *orow[ENC_QB];
            for (int i = 0; i < ENC_QB; i++) {
                pr[i] = sc + (i < nq ? i : 0) * lkp;
                orow[i] = out + b * os[0] + h * os[1] + (int64_t)(i0 + (i < nq ? i : 0)) * os[2];
            }
            for (int c0 = 0; c0 < d; c0 += 32) pv_tile6(pr, vb + c0, vs[2], lk, d - c0 < 32 ? d - c0 : 32, orow, c0, nq, inv);
        }
        continue;
#endif
        for (int i1 = 0; i1 < nq; i1 += 3) {
            const int n3 = nq - i1 < 3 ? nq - i1 : 3;
            const float *pr[3] = {sc + i1 * lkp, sc + (i1 + (n3 > 1)) * lkp, sc + (i1 + 2 * (n3 > 2)) * lkp};
            float *orow[3];
            for (int i = 0; i < 3; i++) orow[i] = out + b * os[0] + h * os[1] + (int64_t)(i0 + i1 + (i < n3 ? i : 0)) * os[2];
            for (int c0 = 0; c0 < d; c0 += 32)
                pv_tile(pr, vb + c0, vs[2], lk, (d - c0) / 8 < 4 ? (d - c0) / 8 : 4, orow, c0, n3, inv + i1);
        }
    }
}

void attention_encoder(const float *q, const float *k, const float *v, int B, int H, int group, int lq, int lk, int d,
                       int64_t qb_, int64_t qh, int64_t qi, int64_t kb_, int64_t kh_, int64_t ki,
                       int64_t vb_, int64_t vh, int64_t vi, float scale, const float *key_bias,
                       float *out, int64_t ob, int64_t oh, int64_t oi, double *received, int bits, int threads) {
    const AttArgs a = {q, k, v, H, group, lq, lk, d, {qb_, qh, qi}, {kb_, kh_, ki}, {vb_, vh, vi}, {ob, oh, oi},
                       scale, key_bias, out, bits};
    #pragma omp parallel num_threads(threads)
    {
        AttScratch s = {0};
        double *mine = received ? calloc((size_t)lk, sizeof(double)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < (int64_t)B * H; bh++) encoder_head(&a, bh, &s, mine);
        if (received) {
            #pragma omp critical
            for (int j = 0; j < lk; j++) received[j] += mine[j];
        }
        free(mine);
        att_scratch_free(&s);
    }
}

/* y[o] = scales[o] * sum_k w[o, k] x[k] (+ bias[o]) for a dense int8 weight (O, K), rows contiguous,
 * symmetric per-row scales; a few token rows of x (T, K) -> y (T, O). The weight is read once per
 * call: each row's int8 values are widened to fp32 in registers and used for every token row. */
void int8_linear(const float *x, int T, const int8_t *w, const float *scales, const float *bias, float *y,
                 int O, int K, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int o = 0; o < O; o++) {
        const int8_t *row = w + (int64_t)o * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + (int64_t)t * K;
            int k = 0;
            float s = 0.0f;
#if defined(__AVX2__)
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (; k + 16 <= K; k += 16) {
                __m128i b = _mm_loadu_si128((const __m128i *)(row + k));
                __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt + k), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + k + 8), a1);
            }
            s = hsum256(_mm256_add_ps(a0, a1));
#endif
            for (; k < K; k++) s += (float)row[k] * xt[k];
            y[(int64_t)t * O + o] = s * scales[o] + (bias ? bias[o] : 0.0f);
        }
    }
}

/* ---- the one-token decode step of a Llama-family model, every layer in one call -------------- */

/* Mask layout (one token; N:M with M dividing 8 read as N8 = 8N/M kept of every 8 inputs): per row,
 * its kept int8 values group by group (N8 a group, ascending position) and one byte a group whose
 * bit p says input p of the group is kept: (N8 + 1) / 8 bytes a weight (6:8: 0.875, against 1.5
 * for the lane layout's value + position bytes and 1.0 for dense int8). A group's values are
 * spread to the kept positions by one byte shuffle whose control a 256-entry table gives per mask:
 * value r goes to the top byte of int32 lane p when bit p is the r-th set bit, every other byte is
 * zeroed (control 0x80), so the lanes read as value * 2^24 and convert to fp32 exactly; the row's
 * scale (times 2^-24) and bias at the end. The values array carries 16 bytes of padding (a group
 * is read as one 16-byte load). */
static uint8_t mask_spread[256][32] __attribute__((aligned(32)));
static int mask_spread_ready = 0;

static void mask_spread_init(void) {
    if (mask_spread_ready) return;
    for (int m = 0; m < 256; m++)
        for (int p = 0, rank = 0; p < 8; p++) {
            mask_spread[m][4 * p] = mask_spread[m][4 * p + 1] = mask_spread[m][4 * p + 2] = 0x80;
            mask_spread[m][4 * p + 3] = (m >> p) & 1 ? (uint8_t)rank++ : 0x80;
        }
    mask_spread_ready = 1;
}

static float mask_row(const float *x, const int8_t *v, const uint8_t *mk, int G8, int N8) {
#if defined(__AVX2__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int g = 0;
#define MASK_GROUP(ACC, G) \
    do { \
        __m256i vb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(v + (int64_t)(G) * N8))); \
        __m256i ctrl = _mm256_load_si256((const __m256i *)mask_spread[mk[G]]); \
        __m256 w = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(vb, ctrl)); \
        ACC = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * (G)), ACC); \
    } while (0)
    for (; g + 4 <= G8; g += 4) {
        _mm_prefetch((const char *)(v + (int64_t)g * N8 + 1024), _MM_HINT_T0);
        MASK_GROUP(a0, g);
        MASK_GROUP(a1, g + 1);
        MASK_GROUP(a2, g + 2);
        MASK_GROUP(a3, g + 3);
    }
    for (; g < G8; g++) MASK_GROUP(a0, g);
#undef MASK_GROUP
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) * 0x1p-24f;
#else
    float s = 0.0f;
    for (int g = 0; g < G8; g++)
        for (int p = 0, r = 0; p < 8; p++)
            if ((mk[g] >> p) & 1) s += (float)v[(int64_t)g * N8 + r++] * x[8 * g + p];
    return s;
#endif
}

/* y (O) = W x for one token, W in the mask layout (vals: O rows of K / 8 * N8 int8, masks: O rows of
 * K / 8 bytes, per-row scales). */
void mask_linear(const float *x, const int8_t *vals, const uint8_t *masks, const float *scales, const float *bias,
                 float *y, int O, int K, int N8, int threads) {
    const int G8 = K / 8;
    mask_spread_init();
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int o = 0; o < O; o++)
        y[o] = mask_row(x, vals + (int64_t)o * G8 * N8, masks + (int64_t)o * G8, G8, N8) * scales[o]
               + (bias ? bias[o] : 0.0f);
}

/* y (O) = W x for a dense fp32 W (O, K), rows contiguous. */
static void dense_linear(const float *x, const float *w, const float *bias, float *y, int O, int K, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int o = 0; o < O; o++) y[o] = dot(x, w + (int64_t)o * K, K) + (bias ? bias[o] : 0.0f);
}

/* A linear of the step table: NF int64 fields. kind 0: dense fp32 (w); 1: dense int8 (w, scales);
 * 2: mask layout (w values, aux masks, scales, n = N8); 3: lane layout (w values, aux positions,
 * scales, vt, n, m; y needs o8 floats). */
enum { F_KIND, F_W, F_AUX, F_SCALES, F_BIAS, F_O, F_O8, F_K, F_N, F_M, F_VT, NF };
#define LAYER_FIELDS (2 + 7 * NF)   /* input norm weight, post-attention norm weight, q k v o gate up down */

static void table_linear(const int64_t *f, const float *x, float *y, int threads) {
    const void *w = (const void *)(intptr_t)f[F_W], *aux = (const void *)(intptr_t)f[F_AUX];
    const float *sc = (const float *)(intptr_t)f[F_SCALES], *b = (const float *)(intptr_t)f[F_BIAS];
    int O = (int)f[F_O], K = (int)f[F_K];
    switch (f[F_KIND]) {
    case 0: dense_linear(x, (const float *)w, b, y, O, K, threads); break;
    case 1: int8_linear(x, 1, (const int8_t *)w, sc, b, y, O, K, threads); break;
    case 2: mask_linear(x, (const int8_t *)w, (const uint8_t *)aux, sc, b, y, O, K, (int)f[F_N], threads); break;
    default: nm_linear_vector(x, w, (const uint8_t *)aux, O, (int)f[F_O8], K, (int)f[F_N], (int)f[F_M], b, y,
                              (int)f[F_VT], sc, threads);
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w (Llama's RMSNorm, the mean in double). */
static void rms_norm(const float *x, const float *w, float *y, int H, float eps) {
    double ss = 0.0;
    for (int i = 0; i < H; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / H) + eps);
    for (int i = 0; i < H; i++) y[i] = w[i] * (x[i] * r);
}

/* Rotary embedding of heads of d (rotate-half form): x' = x cos + rotate_half(x) sin. */
static void rope(float *x, int heads, int d, const float *cos, const float *sin) {
    const int h2 = d / 2;
    for (int h = 0; h < heads; h++) {
        float *r = x + (int64_t)h * d;
        for (int i = 0; i < h2; i++) {
            float a = r[i], b = r[i + h2];
            r[i] = a * cos[i] - b * sin[i];
            r[i + h2] = b * cos[i + h2] + a * sin[i + h2];
        }
    }
}

/* One token through L Llama layers (pre-norm attention and SiLU-gated MLP, each with a residual):
 * h (H floats) in place. The token's K and V land in row n - 1 of each layer's cache (kbuf, vbuf:
 * (L, hkv, cap, d)), attention reads the layer's first n rows, and received[i * n + j] gains the
 * probability key j gets in layer i, summed over heads (SpAtten's token importance). */
void llama_step(const int64_t *table, int L, int H, int hq, int hkv, int d, int I, float eps, float scale,
                float *kbuf, float *vbuf, int64_t cap, int n, const float *cos, const float *sin, float *h,
                double *received, int threads) {
    const int wide = (H > I ? H : I) + hq * d + 16;
    float *x = malloc(sizeof(float) * (size_t)wide), *y = malloc(sizeof(float) * (size_t)wide);
    float *q = malloc(sizeof(float) * (size_t)(hq * d + 16)), *kv = malloc(sizeof(float) * (size_t)(hkv * d + 16));
    float *ctx = malloc(sizeof(float) * (size_t)(hq * d + 16));
    float *g = malloc(sizeof(float) * (size_t)(I + 16)), *u = malloc(sizeof(float) * (size_t)(I + 16));
    for (int l = 0; l < L; l++) {
        const int64_t *t = table + (int64_t)l * LAYER_FIELDS, *lin = t + 2;
        float *kl = kbuf + (int64_t)l * hkv * cap * d, *vl = vbuf + (int64_t)l * hkv * cap * d;
        rms_norm(h, (const float *)(intptr_t)t[0], x, H, eps);
        table_linear(lin + 0 * NF, x, q, threads);
        rope(q, hq, d, cos, sin);
        table_linear(lin + 1 * NF, x, kv, threads);
        rope(kv, hkv, d, cos, sin);
        for (int j = 0; j < hkv; j++) memcpy(kl + ((int64_t)j * cap + n - 1) * d, kv + (int64_t)j * d, sizeof(float) * d);
        table_linear(lin + 2 * NF, x, kv, threads);
        for (int j = 0; j < hkv; j++) memcpy(vl + ((int64_t)j * cap + n - 1) * d, kv + (int64_t)j * d, sizeof(float) * d);
        attention_fused(q, kl, vl, hq, hkv, 1, n, cap, d, scale, NULL, NULL, ctx, received + (int64_t)l * n, threads);
        table_linear(lin + 3 * NF, ctx, y, threads);
        for (int i = 0; i < H; i++) h[i] += y[i];
        rms_norm(h, (const float *)(intptr_t)t[1], x, H, eps);
        table_linear(lin + 4 * NF, x, g, threads);
        table_linear(lin + 5 * NF, x, u, threads);
        for (int i = 0; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];   /* SiLU(gate) * up */
        table_linear(lin + 6 * NF, g, y, threads);
        for (int i = 0; i < H; i++) h[i] += y[i];
    }
    free(x); free(y); free(q); free(kv); free(ctx); free(g); free(u);
}

/* ---- 8. A BERT-family encoder's layers in one call (many tokens, int8 N:M weights) -----------
 *
 * Post-norm layers: h = LN(h + O(attention(Q h, K h, V h))), h = LN(h + Down(GELU(Up h))), every
 * projection an int8 N:M layer on the select kernel (kind 0) or the pair kernel (kind 1), the
 * attention on attention_encoder. One row of int64 fields a linear (E_KIND .. E_ACT; a select
 * linear's lane group G in E_QMAX and block width W in E_KB), and a layer's
 * row: its two LayerNorms' weight and bias, then q k v o up down. What per-layer Python and PyTorch
 * ops cost around the kernels (about 5 ms of a 128-token MiniLM forward) is gone. */
enum { E_KIND, E_P0, E_P1, E_P2, E_P3, E_SCALES, E_BIAS, E_O, E_K, E_N, E_M, E_KB, E_QMAX, E_ACT, NE };
#define ENC_LAYER_FIELDS (4 + 6 * NE)

/* A pair-kernel linear's operands from its row of the encoder's table, on x (T, K) into y. */
static PairArgs pair_args(const int64_t *f, const float *x, int T, float *y) {
#define EP(i) ((const void *)(intptr_t)f[i])
    const PairArgs a = {x, (int)f[E_K], T, (int)f[E_K], (const int32_t *)EP(E_P0), (const uint16_t *)EP(E_P1),
                        (const uint16_t *)EP(E_P2), (const int32_t *)EP(E_P3), (int)f[E_O], (int)f[E_N], (int)f[E_M],
                        (int)f[E_KB], (const float *)EP(E_SCALES), (const float *)EP(E_BIAS), y,
                        (int)f[E_QMAX], (int)f[E_ACT]};
#undef EP
    return a;
}

static void encoder_linear(const int64_t *f, const float *x, int T, float *y, int threads) {
#define EP(i) ((const void *)(intptr_t)f[i])
    const float *sc = (const float *)EP(E_SCALES), *b = (const float *)EP(E_BIAS);
    const int O = (int)f[E_O], K = (int)f[E_K];
    if (f[E_KIND] == 0)
        nm_linear_select(x, K, T, K, (const uint8_t *)EP(E_P0), (const int8_t *)EP(E_P1), (const int32_t *)EP(E_P2),
                         (const int32_t *)EP(E_P3), O, (int)f[E_QMAX], (int)f[E_KB], sc, b, y, (int)f[E_ACT], threads);
    else {
        const PairArgs a = pair_args(f, x, T, y);
        pairs_omp(&a, threads);
    }
#undef EP
}

/* h[t] = LayerNorm(h[t] + a[t]) for tokens t0..t1 (weight g, bias b; two passes: mean, then the
 * centred variance). The sums run in four independent chains (one chain waits out an add's
 * latency every step: the LayerNorms were 7 % of a 1:8 forward, 128 tokens, 1 thread). */
static void residual_layer_norm(float *h, const float *a, int t0, int t1, int D, const float *g, const float *b,
                                float eps) {
    for (int t = t0; t < t1; t++) {
        float *r = h + (int64_t)t * D;
        const float *s = a + (int64_t)t * D;
        int i = 0;
        float sum = 0.0f, sq = 0.0f;
#if defined(__AVX512F__)
#define LN_W 16
#define LN_V __m512
#define LN_LOAD _mm512_loadu_ps
#define LN_STORE _mm512_storeu_ps
#define LN_ADD _mm512_add_ps
#define LN_SUB _mm512_sub_ps
#define LN_MUL _mm512_mul_ps
#define LN_FMA _mm512_fmadd_ps
#define LN_SET1 _mm512_set1_ps
#define LN_HSUM _mm512_reduce_add_ps
#elif defined(__AVX2__)
#define LN_W 8
#define LN_V __m256
#define LN_LOAD _mm256_loadu_ps
#define LN_STORE _mm256_storeu_ps
#define LN_ADD _mm256_add_ps
#define LN_SUB _mm256_sub_ps
#define LN_MUL _mm256_mul_ps
#define LN_FMA _mm256_fmadd_ps
#define LN_SET1 _mm256_set1_ps
#define LN_HSUM hsum256
#endif
#ifdef LN_W
        LN_V c0 = LN_SET1(0.0f), c1 = c0, c2 = c0, c3 = c0;
        for (; i + 4 * LN_W <= D; i += 4 * LN_W) {
            const LN_V x0 = LN_ADD(LN_LOAD(r + i), LN_LOAD(s + i)), x1 = LN_ADD(LN_LOAD(r + i + LN_W), LN_LOAD(s + i + LN_W)),
                       x2 = LN_ADD(LN_LOAD(r + i + 2 * LN_W), LN_LOAD(s + i + 2 * LN_W)),
                       x3 = LN_ADD(LN_LOAD(r + i + 3 * LN_W), LN_LOAD(s + i + 3 * LN_W));
            LN_STORE(r + i, x0); LN_STORE(r + i + LN_W, x1); LN_STORE(r + i + 2 * LN_W, x2); LN_STORE(r + i + 3 * LN_W, x3);
            c0 = LN_ADD(c0, x0); c1 = LN_ADD(c1, x1); c2 = LN_ADD(c2, x2); c3 = LN_ADD(c3, x3);
        }
        for (; i + LN_W <= D; i += LN_W) {
            const LN_V x = LN_ADD(LN_LOAD(r + i), LN_LOAD(s + i));
            LN_STORE(r + i, x);
            c0 = LN_ADD(c0, x);
        }
        sum = LN_HSUM(LN_ADD(LN_ADD(c0, c1), LN_ADD(c2, c3)));
#endif
        for (; i < D; i++) { r[i] += s[i]; sum += r[i]; }
        const float m = sum / D;
        i = 0;
#ifdef LN_W
        const LN_V mv = LN_SET1(m);
        c0 = c1 = c2 = c3 = LN_SET1(0.0f);
        for (; i + 4 * LN_W <= D; i += 4 * LN_W) {
            const LN_V x0 = LN_SUB(LN_LOAD(r + i), mv), x1 = LN_SUB(LN_LOAD(r + i + LN_W), mv),
                       x2 = LN_SUB(LN_LOAD(r + i + 2 * LN_W), mv), x3 = LN_SUB(LN_LOAD(r + i + 3 * LN_W), mv);
            c0 = LN_FMA(x0, x0, c0); c1 = LN_FMA(x1, x1, c1); c2 = LN_FMA(x2, x2, c2); c3 = LN_FMA(x3, x3, c3);
        }
        for (; i + LN_W <= D; i += LN_W) {
            const LN_V x = LN_SUB(LN_LOAD(r + i), mv);
            c0 = LN_FMA(x, x, c0);
        }
        sq = LN_HSUM(LN_ADD(LN_ADD(c0, c1), LN_ADD(c2, c3)));
#endif
        for (; i < D; i++) sq += (r[i] - m) * (r[i] - m);
        const float inv = 1.0f / sqrtf(sq / D + eps);
        i = 0;
#ifdef LN_W
        const LN_V iv = LN_SET1(inv);
        for (; i + LN_W <= D; i += LN_W)
            LN_STORE(r + i, LN_FMA(LN_MUL(LN_SUB(LN_LOAD(r + i), mv), iv), LN_LOAD(g + i), LN_LOAD(b + i)));
#endif
        for (; i < D; i++) r[i] = (r[i] - m) * inv * g[i] + b[i];
    }
}
#undef LN_W
#undef LN_V
#undef LN_LOAD
#undef LN_STORE
#undef LN_ADD
#undef LN_SUB
#undef LN_MUL
#undef LN_FMA
#undef LN_SET1
#undef LN_HSUM

/* ---- 9. Phases on a pool of threads that the caller never waits for -------------------------
 * An OpenMP team waits at the end of every parallel region for each of its threads, so a worker
 * that fell asleep while the process idled puts its wake-up in the path of the next call: on this
 * VM milliseconds, as long as a 128-token MiniLM forward (2 threads after 50 ms idle: 12-16 ms,
 * against 4-6 ms back to back). Here a phase is n chunks claimed by compare-and-swap; the caller
 * claims chunks too and returns once all are done, so a late worker only misses work. One ticket
 * word holds the phase (16 bits), its thread count (8), its chunks (20) and the next chunk (20),
 * so a claim is always of the phase the claimer read. Workers spin POOL_SPIN_NS after their last
 * chunk, then nap 1 ms at a time for SPARSETX_POOL_NAP_MS (default 1000; 0: no naps), then
 * sleep on a condition variable; one caller at a time (another runs its phases alone). The naps
 * are for VMs like this one, where a worker woken from a sleep on the condition variable began
 * 5-8 ms later (instrumented: 2 threads, 128-token 1:8 MiniLM after 300 ms idle, the worker ran
 * 64 of 472 chunks, the caller the rest: 8.9 ms a call, against 3.8 ms back to back), while a
 * worker that naps wakes within a step. A napping worker costs a few % of a core (each wake-up is
 * some 40 us here); Intel OpenMP spins a whole core for its KMP_BLOCKTIME (200 ms) instead. */
#define POOL_SPIN_NS 2000000
#define POOL_NAP_STEP_NS 1000000
static int64_t pool_nap_ns = 1000000000;
#define POOL_MAX 255
#define TK_BITS 20
#define TK_MASK ((1ull << TK_BITS) - 1)

typedef void (*ChunkFn)(void *ctx, int chunk, int tid);

static struct {
    pthread_mutex_t mu, busy;
    pthread_cond_t cv;
    int started;                                 /* workers running: tids 1..started */
    _Atomic uint64_t ticket;
    _Atomic int done, sleepers;
    ChunkFn fn;
    void *ctx;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, NULL};

/* The caller's CPU in the current phase (-1: unknown). */
static _Atomic int pool_caller_cpu = -1;

/* A worker that the scheduler woke on the caller's CPU (seen on this VM after a worker slept on
 * the condition variable: it then spins in the caller's time slices instead of working beside it,
 * and a 2-thread 128-token forward took 8-11 ms against 5.6 on one thread) moves itself off that
 * CPU: an affinity without it migrates the worker at once, and the old affinity is put back. */
static void pool_move_off(void) {
#ifdef __linux__
    const int caller = atomic_load(&pool_caller_cpu);
    if (caller < 0 || caller >= CPU_SETSIZE || sched_getcpu() != caller) return;
    cpu_set_t all, other;
    if (sched_getaffinity(0, sizeof all, &all)) return;
    other = all;
    CPU_CLR(caller, &other);
    if (CPU_COUNT(&other) > 0 && sched_setaffinity(0, sizeof other, &other) == 0)
        sched_setaffinity(0, sizeof all, &all);
#endif
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* One chunk of the phase in ticket t for thread tid, if one is left and tid takes part: returns
 * 0 when there is nothing for tid, else 1 (a chunk ran, or another thread claimed first). */
static int pool_take(uint64_t t, int tid) {
    const uint64_t next = t & TK_MASK, n = (t >> TK_BITS) & TK_MASK, threads = (t >> 40) & 0xff;
    if (next >= n || (uint64_t)tid >= threads) return 0;
    if (atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) {
        pool.fn(pool.ctx, (int)next, tid);   /* the phase cannot move on before this chunk is done */
        atomic_fetch_add(&pool.done, 1);
    }
    return 1;
}

static void *pool_worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    int64_t idle = 0;
    int napping = 0, woke = 1;
    for (unsigned spins = 1;; spins++) {
        const uint64_t t = atomic_load(&pool.ticket);
        if (woke || (spins & 63) == 0) pool_move_off(), woke = 0;   /* after a wake-up or a nap, and now and then */
        if (pool_take(t, tid)) { idle = 0; continue; }
        if (!idle) idle = now_ns();
        const int out = (uint64_t)tid >= ((t >> 40) & 0xff);   /* not in this phase: no spinning */
        const int64_t quiet = out || napping || (spins & 255) == 0 ? now_ns() - idle : 0;
        napping = quiet > POOL_SPIN_NS;
        if (!out && napping && quiet <= pool_nap_ns) {
            const struct timespec nap = {0, POOL_NAP_STEP_NS};
            nanosleep(&nap, NULL);
            woke = 1;
            continue;
        }
        if (out || quiet > pool_nap_ns) {
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.ticket) == t) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mu);
            idle = 0;
            woke = 1;
            continue;
        }
        cpu_relax();
    }
    return NULL;
}

static void pool_after_fork(void) {   /* the child has none of the workers: start afresh */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
}

static void pool_once(void) {
    const char *nap = getenv("SPARSETX_POOL_NAP_MS");
    if (nap && *nap) pool_nap_ns = (int64_t)(atof(nap) * 1e6);
    pthread_atfork(NULL, NULL, pool_after_fork);
}

/* fn(ctx, chunk, tid) for chunk 0..n-1 on up to threads threads (tid 0: the caller). */
static void pool_run(ChunkFn fn, void *ctx, int n, int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (threads > POOL_MAX) threads = POOL_MAX;
    if (threads <= 1 || n <= 1 || (uint64_t)n > TK_MASK || pthread_once(&once, pool_once)
        || pthread_mutex_trylock(&pool.busy)) {
        for (int i = 0; i < n; i++) fn(ctx, i, 0);
        return;
    }
    while (pool.started < threads - 1) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        const int err = pthread_create(&th, &at, pool_worker, (void *)(intptr_t)(pool.started + 1));
        pthread_attr_destroy(&at);
        if (err) break;   /* fewer workers: the caller takes their chunks */
        pool.started++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
#ifdef __linux__
    atomic_store(&pool_caller_cpu, sched_getcpu());
#endif
    atomic_store(&pool.done, 0);
    const uint64_t t = (((atomic_load(&pool.ticket) >> 48) + 1) << 48) | ((uint64_t)threads << 40)
                       | ((uint64_t)n << TK_BITS);
    atomic_store(&pool.ticket, t);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    for (;;) {
        const uint64_t c = atomic_load(&pool.ticket);
        if ((c & TK_MASK) >= (uint64_t)n) break;
        pool_take(c, 0);
    }
    /* a worker's last chunks: spin, then yield (a worker on this CPU cannot finish them meanwhile) */
    for (unsigned spins = 0; atomic_load(&pool.done) < n; spins++) {
        if (spins < 4096) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.busy);
}

/* ---- the encoder's phases ---------------------------------------------------------------------- */
#define LN_ROWS 8   /* tokens a LayerNorm chunk */

typedef struct {
    const int64_t *table;
    int n, D, H, I, d, threads;
    float eps, *h, *u;
    uint8_t **xq;            /* per thread: a select tile's quantised inputs */
    AttScratch *att;         /* per thread */
    AttArgs a;
    /* the current phase */
    const int64_t *lin[3];
    const float *x, *res;
    float *y[3];
    int nlin, tiles, splits;
    const float *g, *b;
} Encoder;

#ifdef HAS_SELECT
/* Chunk c of a phase of nlin linears of one input: token tile c / splits, quantised once, then
 * part c % splits of every linear's lane groups. */
static void linear_chunk(void *ctx, int c, int tid) {
    Encoder *e = ctx;
    const int tt = c / e->splits, part = c % e->splits;
    if (!e->xq[tid]) e->xq[tid] = aligned_alloc(64, (size_t)SEL_TT * select_stride(e->D > e->I ? e->D : e->I));
    float sx[SEL_TT];
    for (int li = 0; li < e->nlin; li++) {
        const int64_t *f = e->lin[li];
#define EP(i) ((const void *)(intptr_t)f[i])
        const int K = (int)f[E_K], O = (int)f[E_O], L = (O + SEL_G - 1) / SEL_G;
        const SelArgs a = {e->x, K, e->n, K, (const uint8_t *)EP(E_P0), (const int8_t *)EP(E_P1),
                           (const int32_t *)EP(E_P2), (const int32_t *)EP(E_P3), O, (int)f[E_QMAX], (int)f[E_KB],
                           (const float *)EP(E_SCALES), (const float *)EP(E_BIAS), e->y[li], (int)f[E_ACT]};
#undef EP
        if (li == 0) {   /* the linears share the input (and K): its tile is quantised once */
            const int t0 = tt * SEL_TT, nt = e->n - t0 < SEL_TT ? e->n - t0 : SEL_TT;
            select_quantise(e->x, K, t0, nt, K, select_stride(K), e->xq[tid], sx);
        }
        select_lanes(&a, tt, (int)((int64_t)L * part / e->splits), (int)((int64_t)L * (part + 1) / e->splits),
                     e->xq[tid], sx);
    }
}
#endif

/* Chunk c of a phase of nlin pair-kernel linears of one input: linear c / (tiles splits), token
 * tile (c / splits) % tiles, rows part c % splits. */
static void pair_chunk(void *ctx, int c, int tid) {
    Encoder *e = ctx;
    (void)tid;
    const int per = e->tiles * e->splits, li = c / per, tt = c % per / e->splits, part = c % e->splits;
    const int64_t *f = e->lin[li];
    const PairArgs a = pair_args(f, e->x, e->n, e->y[li]);
    int p0, p1;
    pair_rows(((int)f[E_O] + ROWG - 1) / ROWG, part, e->splits, &p0, &p1);
    pairs_part(&a, tt, tt + 1, p0, p1);
}

/* y[i] = linear i (table rows lin[i]) of x, for nlin linears of the same input: one phase of token
 * tiles (split further by rows when there are few) on the select kernel or the pair kernel. */
static void encoder_linears(Encoder *e, const int64_t *lin, int nlin, const float *x, float *y0, float *y1, float *y2) {
    float *ys[3] = {y0, y1, y2};
    int select = 1, pairs = 1;
    for (int i = 0; i < nlin; i++) {
        select &= lin[(int64_t)i * NE + E_KIND] == 0;
        pairs &= lin[(int64_t)i * NE + E_KIND] != 0;
    }
#ifdef HAS_SELECT
    if (select) {
        e->x = x;
        e->nlin = nlin;
        e->tiles = (e->n + SEL_TT - 1) / SEL_TT;
        e->splits = e->tiles >= 2 * e->threads ? 1 : (2 * e->threads + e->tiles - 1) / e->tiles;
        for (int i = 0; i < nlin; i++) {
            e->lin[i] = lin + (int64_t)i * NE;
            e->y[i] = ys[i];
            const int L = ((int)e->lin[i][E_O] + SEL_G - 1) / SEL_G;
            if (e->splits > L) e->splits = L;
        }
        pool_run(linear_chunk, e, e->tiles * e->splits, e->threads);
        return;
    }
#endif
    if (pairs) {   /* pair kernels: chunks of a token tile (split by rows when there are few) */
        e->x = x;
        e->nlin = nlin;
        e->tiles = (e->n + PAIR_TW - 1) / PAIR_TW;
        e->splits = e->tiles >= 2 * e->threads ? 1 : (2 * e->threads + e->tiles - 1) / e->tiles;
        for (int i = 0; i < nlin; i++) {
            e->lin[i] = lin + (int64_t)i * NE;
            e->y[i] = ys[i];
            const int steps = ((int)e->lin[i][E_O] + PAIR_R - 1) / PAIR_R;
            if (e->splits > steps) e->splits = steps;
        }
        pool_run(pair_chunk, e, nlin * e->tiles * e->splits, e->threads);
        return;
    }
    (void)select;
    for (int i = 0; i < nlin; i++) encoder_linear(lin + (int64_t)i * NE, x, e->n, ys[i], e->threads);   /* mixed kinds */
}

static void attention_chunk(void *ctx, int c, int tid) {
    Encoder *e = ctx;
    encoder_head(&e->a, c, &e->att[tid], NULL);
}

static void norm_chunk(void *ctx, int c, int tid) {
    Encoder *e = ctx;
    (void)tid;
    const int t0 = c * LN_ROWS, t1 = t0 + LN_ROWS < e->n ? t0 + LN_ROWS : e->n;
    residual_layer_norm(e->h, e->res, t0, t1, e->D, e->g, e->b, e->eps);
}

static void encoder_norm(Encoder *e, const float *res, const int64_t *gb) {
    e->res = res;
    e->g = (const float *)(intptr_t)gb[0];
    e->b = (const float *)(intptr_t)gb[1];
    pool_run(norm_chunk, e, (e->n + LN_ROWS - 1) / LN_ROWS, e->threads);
}

/* Word + token type + absolute position embeddings (summed in BertEmbeddings' order) and their
 * LayerNorm for the tokens of chunk c. */
typedef struct {
    Encoder *e;
    const int64_t *ids, *types;
    const float *word, *type, *pos, *g, *b;
    float eps;
    int T;
} Embed;

static void embed_chunk(void *ctx, int c, int tid) {
    const Embed *m = ctx;
    const int D = m->e->D, t0 = c * LN_ROWS, t1 = t0 + LN_ROWS < m->e->n ? t0 + LN_ROWS : m->e->n;
    (void)tid;
    for (int t = t0; t < t1; t++) {
        float *r = m->e->h + (int64_t)t * D;
        const float *w = m->word + m->ids[t] * D, *ty = m->type + (m->types ? m->types[t] : 0) * D;
        for (int i = 0; i < D; i++) r[i] = w[i] + ty[i];
        residual_layer_norm(r, m->pos + (int64_t)(t % m->T) * D, 0, 1, D, m->g, m->b, m->eps);
    }
}

static Encoder encoder_begin(const int64_t *table, int B, int T, int D, int H, int I, float eps, float *h,
                             const float *key_bias, int attention_bits, int threads) {
    const int64_t n = (int64_t)B * T, d = D / H;
    if (threads < 1) threads = 1;
    if (threads > POOL_MAX) threads = POOL_MAX;
    Encoder e = {table, (int)n, D, H, I, (int)d, threads, eps, h, NULL,
                 calloc((size_t)threads, sizeof(uint8_t *)), calloc((size_t)threads, sizeof(AttScratch))};
    float *q = malloc(sizeof(float) * n * D), *k = malloc(sizeof(float) * n * D), *v = malloc(sizeof(float) * n * D),
          *ctx = malloc(sizeof(float) * n * D);
    /* (B, T, H, d) read as (B, H, T, d); the context lands as (B, T, H, d) = (n, D) */
    e.a = (AttArgs){q, k, v, H, 1, T, T, (int)d, {(int64_t)T * D, d, D}, {(int64_t)T * D, d, D}, {(int64_t)T * D, d, D},
                    {(int64_t)T * D, d, D}, 1.0f / sqrtf((float)d), key_bias, ctx, attention_bits};
    e.u = malloc(sizeof(float) * n * (I > D ? I : D));
    return e;
}

static void encoder_end(Encoder *e) {
    for (int i = 0; i < e->threads; i++) {
        free(e->xq[i]);
        att_scratch_free(&e->att[i]);
    }
    free(e->xq); free(e->att);
    free((void *)e->a.q); free((void *)e->a.k); free((void *)e->a.v); free(e->a.out); free(e->u);
}

/* Post-norm layers on e->h (see the top of section 8), every phase on the pool. */
static void encoder_run(Encoder *e, int L) {
    float *q = (float *)e->a.q, *k = (float *)e->a.k, *v = (float *)e->a.v, *ctx = e->a.out, *u = e->u, *h = e->h;
    for (int l = 0; l < L; l++) {
        const int64_t *t = e->table + (int64_t)l * ENC_LAYER_FIELDS, *lin = t + 4;
        encoder_linears(e, lin, 3, h, q, k, v);
        pool_run(attention_chunk, e, e->n / e->a.lq * e->H, e->threads);
        encoder_linears(e, lin + 3 * NE, 1, ctx, u, NULL, NULL);
        encoder_norm(e, u, t);
        encoder_linears(e, lin + 4 * NE, 1, h, u, NULL, NULL);   /* up (+ GELU): u (n, I) */
        encoder_linears(e, lin + 5 * NE, 1, u, q, NULL, NULL);   /* down: q (n, D) */
        encoder_norm(e, q, t + 2);
    }
}

/* h (B, T, D) in place through L layers of H heads (D / H each) and I intermediate units. key_bias
 * (B, T): added to every query's scores (-inf: a padding key), or NULL; attention_bits 32 or 8
 * (attention_encoder's bits). */
void encoder_layers(const int64_t *table, int L, int B, int T, int D, int H, int I, float eps, float *h,
                    const float *key_bias, int attention_bits, int threads) {
    Encoder e = encoder_begin(table, B, T, D, H, I, eps, h, key_bias, attention_bits, threads);
    encoder_run(&e, L);
    encoder_end(&e);
}

/* The whole BERT base model for token ids (B, T) (types (B, T) or NULL: type 0): embeddings into h
 * (B, T, D), the layers, and, when emb[5] is not 0, the pooler: pooled (B, D) = tanh(W h[b, 0] + b).
 * emb: pointers to the word, token type and position tables, the embedding LayerNorm's weight and
 * bias, the pooler's weight (D, D) and bias. The caller checks ids and types against the tables. */
void encoder_forward(const int64_t *table, int L, int B, int T, int D, int H, int I, float eps, const int64_t *ids,
                     const int64_t *types, const int64_t *emb, float emb_eps, float *h, const float *key_bias,
                     float *pooled, int attention_bits, int threads) {
#define PF(i) ((const float *)(intptr_t)emb[i])
    Encoder e = encoder_begin(table, B, T, D, H, I, eps, h, key_bias, attention_bits, threads);
    Embed m = {&e, ids, types, PF(0), PF(1), PF(2), PF(3), PF(4), emb_eps, T};
    pool_run(embed_chunk, &m, (e.n + LN_ROWS - 1) / LN_ROWS, e.threads);
    encoder_run(&e, L);
    if (emb[5])
        for (int b = 0; b < B; b++)
            for (int o = 0; o < D; o++)
                pooled[(int64_t)b * D + o] = tanhf(dot(h + (int64_t)b * T * D, PF(5) + (int64_t)o * D, D) + PF(6)[o]);
#undef PF
    encoder_end(&e);
}
