/*
 * spar_cpu.c -- spar's CPU noise generator: Philox4x32-10 normals (philox.h) for whole
 * parameters, consumed in the loop that draws them. Loaded by spar/_native.py with ctypes
 * (plain C ABI, raw pointers, no Python or torch headers), built at first use with
 * -O3 -march=native -ffp-contract=off -fno-math-errno [-fopenmp].
 *
 * Layout: a parameter is a row-major (rows, cols) array; out / g arrays are
 * (num_samples, rows, cols) row-major. Element (s, r, c) is lane c % 4 of
 * Philox(counter = (c / 4, first_row + r, first_sample + s, step), key = (seed, pid)).
 *
 * Work is split into tasks of (one row, TILE_COLS columns) x all samples, so that the
 * per-element operands (mu, sigma, the accumulator) stay in L1 while the samples are
 * walked. Inside a task, BLK counters (4 * BLK normals) are generated at a time into a
 * stack buffer: the Philox loop over BLK independent counters and the Box-Muller loop
 * are straight-line float/uint32 code that gcc vectorises (no libm calls). Tasks are
 * spread over `nthreads` OpenMP threads (the caller passes torch.get_num_threads(); when
 * torch is loaded its libgomp.so.1 is the one this library binds to, so both share one
 * thread pool); small calls run on the calling thread without touching OpenMP.
 *
 * Memory traffic per output element (fp32 = 4 bytes) is noted at each entry point;
 * generation itself touches only the stack buffer.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "philox.h"

#define SPAR_CPU_ABI 1

#define BLK 32          /* counters per generated block: two AVX-512 vectors in flight */
#define BLK_N (4 * BLK) /* normals per block */
#define TILE_COLS 1024  /* columns per task (a multiple of BLK_N) */
#define MIN_WORK_PER_THREAD 32768 /* normals: below this, another thread costs more than it saves */

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Philox integers of the BLK counters (g0 + j, c1, c2, c3), j < BLK: x[l][j] is lane l.
 * gcc vectorises the portable loop, but it widens the 32x32->64 products to 64-bit lanes
 * (vpmovzxdq + vpmullq + permutes), which leaves Philox shuffle-bound; the AVX-512 and AVX2
 * versions take the high halves with vpmuludq on even and odd lanes and a blend, the low
 * halves with vpmulld, and keep BLK / lanes independent chains in flight. All three give
 * the same integers (tests build each variant). Traffic: writes 16 bytes per counter
 * (4 bytes per normal) to the caller's stack buffer; reads nothing. */
static inline void philox_block(uint32_t g0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1, uint32_t x[4][BLK]) {
#if defined(__AVX512F__) && !defined(SPAR_PORTABLE_PHILOX)
#define NV (BLK / 16)
    __m512i v0[NV], v1[NV], v2[NV], v3[NV];
    const __m512i ma = _mm512_set1_epi32((int)SPAR_PHILOX_ROUND_A);
    const __m512i mb = _mm512_set1_epi32((int)SPAR_PHILOX_ROUND_B);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int v = 0; v < NV; ++v) {
        v0[v] = _mm512_add_epi32(_mm512_set1_epi32((int)(g0 + 16u * (uint32_t)v)), iota);
        v1[v] = _mm512_set1_epi32((int)c1);
        v2[v] = _mm512_set1_epi32((int)c2);
        v3[v] = _mm512_set1_epi32((int)c3);
    }
    for (int i = 0; i < SPAR_PHILOX_ROUNDS; ++i) {
        const __m512i kk0 = _mm512_set1_epi32((int)k0), kk1 = _mm512_set1_epi32((int)k1);
        for (int v = 0; v < NV; ++v) {
            /* high halves: even lanes from vpmuludq of the evens, odd lanes of the odds */
            __m512i pe0 = _mm512_mul_epu32(v0[v], ma);
            __m512i po0 = _mm512_mul_epu32(_mm512_srli_epi64(v0[v], 32), ma);
            __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe0, 32), po0);
            __m512i lo0 = _mm512_mullo_epi32(v0[v], ma);
            __m512i pe2 = _mm512_mul_epu32(v2[v], mb);
            __m512i po2 = _mm512_mul_epu32(_mm512_srli_epi64(v2[v], 32), mb);
            __m512i hi2 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe2, 32), po2);
            __m512i lo2 = _mm512_mullo_epi32(v2[v], mb);
            v0[v] = _mm512_ternarylogic_epi32(hi2, v1[v], kk0, 0x96); /* a ^ b ^ c */
            v1[v] = lo2;
            v2[v] = _mm512_ternarylogic_epi32(hi0, v3[v], kk1, 0x96);
            v3[v] = lo0;
        }
        k0 += SPAR_PHILOX_KEY_A;
        k1 += SPAR_PHILOX_KEY_B;
    }
    for (int v = 0; v < NV; ++v) {
        _mm512_storeu_si512((void *)(x[0] + 16 * v), v0[v]);
        _mm512_storeu_si512((void *)(x[1] + 16 * v), v1[v]);
        _mm512_storeu_si512((void *)(x[2] + 16 * v), v2[v]);
        _mm512_storeu_si512((void *)(x[3] + 16 * v), v3[v]);
    }
#undef NV
#elif defined(__AVX2__) && !defined(SPAR_PORTABLE_PHILOX)
#define NV (BLK / 8)
    __m256i v0[NV], v1[NV], v2[NV], v3[NV];
    const __m256i ma = _mm256_set1_epi32((int)SPAR_PHILOX_ROUND_A);
    const __m256i mb = _mm256_set1_epi32((int)SPAR_PHILOX_ROUND_B);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int v = 0; v < NV; ++v) {
        v0[v] = _mm256_add_epi32(_mm256_set1_epi32((int)(g0 + 8u * (uint32_t)v)), iota);
        v1[v] = _mm256_set1_epi32((int)c1);
        v2[v] = _mm256_set1_epi32((int)c2);
        v3[v] = _mm256_set1_epi32((int)c3);
    }
    for (int i = 0; i < SPAR_PHILOX_ROUNDS; ++i) {
        const __m256i kk0 = _mm256_set1_epi32((int)k0), kk1 = _mm256_set1_epi32((int)k1);
        for (int v = 0; v < NV; ++v) {
            __m256i pe0 = _mm256_mul_epu32(v0[v], ma);
            __m256i po0 = _mm256_mul_epu32(_mm256_srli_epi64(v0[v], 32), ma);
            __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
            __m256i lo0 = _mm256_mullo_epi32(v0[v], ma);
            __m256i pe2 = _mm256_mul_epu32(v2[v], mb);
            __m256i po2 = _mm256_mul_epu32(_mm256_srli_epi64(v2[v], 32), mb);
            __m256i hi2 = _mm256_blend_epi32(_mm256_srli_epi64(pe2, 32), po2, 0xAA);
            __m256i lo2 = _mm256_mullo_epi32(v2[v], mb);
            v0[v] = _mm256_xor_si256(_mm256_xor_si256(hi2, v1[v]), kk0);
            v1[v] = lo2;
            v2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, v3[v]), kk1);
            v3[v] = lo0;
        }
        k0 += SPAR_PHILOX_KEY_A;
        k1 += SPAR_PHILOX_KEY_B;
    }
    for (int v = 0; v < NV; ++v) {
        _mm256_storeu_si256((__m256i *)(x[0] + 8 * v), v0[v]);
        _mm256_storeu_si256((__m256i *)(x[1] + 8 * v), v1[v]);
        _mm256_storeu_si256((__m256i *)(x[2] + 8 * v), v2[v]);
        _mm256_storeu_si256((__m256i *)(x[3] + 8 * v), v3[v]);
    }
#undef NV
#else
    for (int j = 0; j < BLK; ++j) {
        spar_u32x4 r = spar_philox4x32_10(g0 + (uint32_t)j, c1, c2, c3, k0, k1);
        x[0][j] = r.x;
        x[1][j] = r.y;
        x[2][j] = r.z;
        x[3][j] = r.w;
    }
#endif
}

/* Normals of the BLK counters (g0 + j, c1, c2, c3), j < BLK, into out[0 .. 4 BLK): lane l of
 * counter j goes to out[4 j + l]. Box-Muller is one vectorised loop over the lanes; the
 * last loop interleaves the lanes. Traffic: writes 4 bytes per normal (normally to L1). */
static inline void gen_block(uint32_t g0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1, float *restrict out) {
    uint32_t x[4][BLK];
    float n[4][BLK];
    philox_block(g0, c1, c2, c3, k0, k1, x);
    for (int j = 0; j < BLK; ++j) {
        spar_box_muller(x[0][j], x[1][j], &n[0][j], &n[1][j]);
        spar_box_muller(x[2][j], x[3][j], &n[2][j], &n[3][j]);
    }
    for (int j = 0; j < BLK; ++j) {
        out[4 * j + 0] = n[0][j];
        out[4 * j + 1] = n[1][j];
        out[4 * j + 2] = n[2][j];
        out[4 * j + 3] = n[3][j];
    }
}

enum { KIND_NORMAL, KIND_SAMPLE_F32, KIND_SAMPLE_F64, KIND_EPS_DOT };

typedef struct {
    int kind;
    uint32_t k0, k1, step, first_sample, first_row;
    int64_t ns, rows, cols, tiles;
    float *out;        /* normal, sample_f32: (ns, rows, cols) */
    double *out64;     /* sample_f64: (ns, rows, cols) */
    const float *mu;   /* sample: (rows, cols) or NULL (zero mean) */
    const float *sig;  /* sample: (rows, cols) */
    const float *g;    /* eps_dot: (ns, rows, cols) */
    float *acc;        /* eps_dot: (rows, cols), accumulated in place */
} job_t;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Task t = (row r, column tile): all samples of columns [c_lo, c_hi) of row r. Traffic per
 * element: as the entry point that set up the job (below); the per-row operands (mu,
 * sigma, acc: at most TILE_COLS * 4 bytes each) stay in L1 across the samples. */
static void run_task(const job_t *J, int64_t t) {
    const int64_t r = t / J->tiles;
    const int64_t c_lo = (t % J->tiles) * TILE_COLS;
    const int64_t c_hi = min64(c_lo + TILE_COLS, J->cols);
    const int64_t plane = J->rows * J->cols; /* elements per sample */
    const int64_t row_off = r * J->cols;
    const uint32_t row = J->first_row + (uint32_t)r;
    float buf[BLK_N];

    if (J->kind == KIND_EPS_DOT) {
        /* acc[r, c] += sum_s g[s, r, c] * eps_s[r, c], the samples summed in order */
        for (int64_t c = c_lo; c < c_hi; c += BLK_N) {
            const int64_t n = min64(BLK_N, c_hi - c);
            float a[BLK_N];
            float *acc = J->acc + row_off + c;
            memcpy(a, acc, (size_t)n * sizeof(float));
            for (int64_t s = 0; s < J->ns; ++s) {
                gen_block((uint32_t)(c >> 2), row, J->first_sample + (uint32_t)s, J->step, J->k0,
                          J->k1, buf);
                const float *g = J->g + s * plane + row_off + c;
                if (n == BLK_N) {
                    for (int i = 0; i < BLK_N; ++i) a[i] = a[i] + g[i] * buf[i];
                } else {
                    for (int64_t i = 0; i < n; ++i) a[i] = a[i] + g[i] * buf[i];
                }
            }
            memcpy(acc, a, (size_t)n * sizeof(float));
        }
        return;
    }

    for (int64_t s = 0; s < J->ns; ++s) {
        const uint32_t smp = J->first_sample + (uint32_t)s;
        const int64_t base = s * plane + row_off;
        for (int64_t c = c_lo; c < c_hi; c += BLK_N) {
            const int64_t n = min64(BLK_N, c_hi - c);
            const uint32_t g0 = (uint32_t)(c >> 2);
            switch (J->kind) {
            case KIND_NORMAL: {
                float *o = J->out + base + c;
                if (n == BLK_N) {
                    gen_block(g0, row, smp, J->step, J->k0, J->k1, o);
                } else {
                    gen_block(g0, row, smp, J->step, J->k0, J->k1, buf);
                    memcpy(o, buf, (size_t)n * sizeof(float));
                }
                break;
            }
            case KIND_SAMPLE_F32: {
                float *restrict o = J->out + base + c;
                const float *sig = J->sig + row_off + c;
                gen_block(g0, row, smp, J->step, J->k0, J->k1, buf);
                if (J->mu) {
                    const float *mu = J->mu + row_off + c;
                    if (n == BLK_N) {
                        for (int i = 0; i < BLK_N; ++i) o[i] = mu[i] + sig[i] * buf[i];
                    } else {
                        for (int64_t i = 0; i < n; ++i) o[i] = mu[i] + sig[i] * buf[i];
                    }
                } else {
                    for (int64_t i = 0; i < n; ++i) o[i] = sig[i] * buf[i];
                }
                break;
            }
            case KIND_SAMPLE_F64: {
                double *restrict o = J->out64 + base + c;
                const float *sig = J->sig + row_off + c;
                gen_block(g0, row, smp, J->step, J->k0, J->k1, buf);
                if (J->mu) {
                    const float *mu = J->mu + row_off + c;
                    for (int64_t i = 0; i < n; ++i) o[i] = (double)(mu[i] + sig[i] * buf[i]);
                } else {
                    for (int64_t i = 0; i < n; ++i) o[i] = (double)(sig[i] * buf[i]);
                }
                break;
            }
            }
        }
    }
}

/* Split the job into (row, tile) tasks over min(nthreads, tasks, work / 32 K) threads
 * (static schedule: the same thread count gives the same partition, and results never
 * depend on it: every element is computed by exactly one thread, in the same order). */
static void run(job_t *J, int nthreads) {
    if (J->ns <= 0 || J->rows <= 0 || J->cols <= 0) return;
    J->tiles = (J->cols + TILE_COLS - 1) / TILE_COLS;
    const int64_t ntasks = J->rows * J->tiles;
    int64_t work = J->ns * J->rows * J->cols;
    int64_t nt = nthreads < 1 ? 1 : nthreads;
    nt = min64(nt, min64(ntasks, work / MIN_WORK_PER_THREAD));
#ifdef _OPENMP
    if (nt > 1) {
        const int nti = (int)nt;
#pragma omp parallel for num_threads(nti) schedule(static)
        for (int64_t t = 0; t < ntasks; ++t) run_task(J, t);
        return;
    }
#endif
    for (int64_t t = 0; t < ntasks; ++t) run_task(J, t);
}

/* ABI version of this library: spar/_native.py refuses a library whose number differs. */
EXPORT int spar_cpu_abi(void) { return SPAR_CPU_ABI; }

/* 1 when built with OpenMP (nthreads > 1 can run in parallel). */
EXPORT int spar_cpu_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Raw Philox integers of n arbitrary counters (tests): ctr (n, 4), key (n, 2) -> out (n, 4).
 * Traffic per counter: reads 24 bytes, writes 16. */
EXPORT void spar_philox_batch(int64_t n, const uint32_t *ctr, const uint32_t *key, uint32_t *out) {
    for (int64_t i = 0; i < n; ++i) {
        spar_u32x4 r = spar_philox4x32_10(ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2],
                                          ctr[4 * i + 3], key[2 * i], key[2 * i + 1]);
        out[4 * i] = r.x;
        out[4 * i + 1] = r.y;
        out[4 * i + 2] = r.z;
        out[4 * i + 3] = r.w;
    }
}

/* The four normals of n arbitrary counters (tests): ctr (n, 4), key (n, 2) -> out (n, 4).
 * Traffic per counter: reads 24 bytes, writes 16. */
EXPORT void spar_normal_batch(int64_t n, const uint32_t *ctr, const uint32_t *key, float *out) {
    for (int64_t i = 0; i < n; ++i) {
        spar_f32x4 v = spar_normal4(ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3],
                                    key[2 * i], key[2 * i + 1]);
        out[4 * i] = v.x;
        out[4 * i + 1] = v.y;
        out[4 * i + 2] = v.z;
        out[4 * i + 3] = v.w;
    }
}

/* out[s, r, c] = eps for samples first_sample + [0, ns), rows first_row + [0, rows).
 * Traffic per element: writes 4 bytes. */
EXPORT void spar_normal(float *out, uint32_t seed, uint32_t pid, uint32_t step,
                        uint32_t first_sample, int64_t ns, uint32_t first_row, int64_t rows,
                        int64_t cols, int nthreads) {
    job_t J = {KIND_NORMAL, seed, pid, step, first_sample, first_row, ns, rows, cols, 0,
               out, NULL, NULL, NULL, NULL, NULL};
    run(&J, nthreads);
}

/* out[s, r, c] = mu[r, c] + sigma[r, c] * eps (mu NULL: zero mean), fp32 math and output.
 * Traffic per element: writes 4 bytes; reads 8 bytes of mu and sigma once per
 * (row, tile), reused from L1 by all ns samples. */
EXPORT void spar_sample_f32(float *out, const float *mu, const float *sigma, uint32_t seed,
                            uint32_t pid, uint32_t step, uint32_t first_sample, int64_t ns,
                            int64_t rows, int64_t cols, int nthreads) {
    job_t J = {KIND_SAMPLE_F32, seed, pid, step, first_sample, 0, ns, rows, cols, 0,
               out, NULL, mu, sigma, NULL, NULL};
    run(&J, nthreads);
}

/* As spar_sample_f32 (fp32 math), the result widened to fp64. Traffic per element: writes
 * 8 bytes; reads mu and sigma as spar_sample_f32. */
EXPORT void spar_sample_f64(double *out, const float *mu, const float *sigma, uint32_t seed,
                            uint32_t pid, uint32_t step, uint32_t first_sample, int64_t ns,
                            int64_t rows, int64_t cols, int nthreads) {
    job_t J = {KIND_SAMPLE_F64, seed, pid, step, first_sample, 0, ns, rows, cols, 0,
               NULL, out, mu, sigma, NULL, NULL};
    run(&J, nthreads);
}

/* acc[r, c] += sum_s g[s, r, c] * eps_s[r, c] (the grad-rho reduction; eps of rows
 * first_row + r), summed in sample order, eps regenerated and never stored.
 * Traffic per (sample, element): reads 4 bytes of g; acc is read and written once per
 * element (8 bytes), not per sample. */
EXPORT void spar_eps_dot(float *acc, const float *g, uint32_t seed, uint32_t pid, uint32_t step,
                         uint32_t first_sample, int64_t ns, uint32_t first_row, int64_t rows,
                         int64_t cols, int nthreads) {
    job_t J = {KIND_EPS_DOT, seed, pid, step, first_sample, first_row, ns, rows, cols, 0,
               NULL, NULL, NULL, NULL, g, acc};
    run(&J, nthreads);
}
