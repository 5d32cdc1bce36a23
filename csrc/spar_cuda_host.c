/*
 * spar_cuda_host.c -- the host build of spar's CUDA kernels, for the tests (no GPU needed).
 *
 * Compiles spar_cuda.cuh (the per-thread work of every kernel of spar_cuda.cu) as plain C
 * with the C compiler, -ffp-contract=off as the kernels' --fmad=false, and exports, per
 * kernel K of spar_cuda.cu, host_K(grid_x, grid_y, <K's arguments>): it runs K's thread
 * function for every thread of that launch grid (blocks of SPAR_BLOCK threads) on the
 * calling thread. tests/ops/test_cuda_host.py compares the results with spar.rng and the
 * torch backend, and routes the cuda backend's launchers to these functions to run its
 * Python layer on CPU tensors. Not used by spar itself.
 */
#include "spar_cuda.cuh"

#define SPAR_BLOCK 256 /* as spar_cuda.cu */

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

#define SPAR_FOR_GRID(gx, gy)                                                                    \
    for (int64_t y = 0; y < (gy); ++y)                                                           \
        for (int64_t t = 0; t < (gx) * SPAR_BLOCK; ++t)

#define HOST_SAMPLE(name, DT)                                                                    \
    EXPORT void host_##name(int64_t gx, int64_t gy, void *out, const float *mu,                  \
                            const float *sig, int64_t rows, int64_t cols, int64_t ns,            \
                            int64_t spt, uint32_t seed, uint32_t pid, uint32_t step,             \
                            uint32_t first_sample, uint32_t first_row) {                         \
        SPAR_FOR_GRID(gx, gy)                                                                    \
        spar_sample_thread(out, mu, sig, rows, cols, ns, spt, seed, pid, step, first_sample,     \
                           first_row, t, y, DT);                                                 \
    }
HOST_SAMPLE(spar_sample_f32, SPAR_F32)
HOST_SAMPLE(spar_sample_f16, SPAR_F16)
HOST_SAMPLE(spar_sample_bf16, SPAR_BF16)

#define HOST_SAMPLE_BWD(name, DT)                                                                \
    EXPORT void host_##name(int64_t gx, int64_t gy, const void *g, const float *rho,             \
                            float *gmu, float *geps, int64_t rows, int64_t cols, int64_t ns,     \
                            uint32_t seed, uint32_t pid, uint32_t step, uint32_t first_sample,   \
                            int flags) {                                                         \
        SPAR_FOR_GRID(gx, gy)                                                                    \
        spar_sample_bwd_thread(g, rho, gmu, geps, rows, cols, ns, seed, pid, step,               \
                               first_sample, flags, t, DT);                                      \
    }
HOST_SAMPLE_BWD(spar_sample_bwd_f32, SPAR_F32)
HOST_SAMPLE_BWD(spar_sample_bwd_f16, SPAR_F16)
HOST_SAMPLE_BWD(spar_sample_bwd_bf16, SPAR_BF16)

#define HOST_LRT(name, DT_IN, DT_OUT)                                                            \
    EXPORT void host_##name(int64_t gx, int64_t gy, const void *var, const void *dy,             \
                            void *out, int64_t R, int64_t C, int64_t B, int64_t var_ss,          \
                            uint32_t seed, uint32_t noise_id, uint32_t step,                     \
                            uint32_t first_sample, uint32_t data_offset) {                       \
        SPAR_FOR_GRID(gx, gy)                                                                    \
        spar_lrt_noise_thread(var, dy, out, R, C, B, var_ss, seed, noise_id, step,               \
                              first_sample, data_offset, t, DT_IN, DT_OUT);                      \
    }
HOST_LRT(spar_lrt_noise_f32, SPAR_F32, SPAR_F32)
HOST_LRT(spar_lrt_noise_f16, SPAR_F16, SPAR_F16)
HOST_LRT(spar_lrt_noise_bf16, SPAR_BF16, SPAR_BF16)
HOST_LRT(spar_lrt_noise_f16_f32, SPAR_F16, SPAR_F32)
HOST_LRT(spar_lrt_noise_bf16_f32, SPAR_BF16, SPAR_F32)

#define HOST_SIGN(name, DT)                                                                      \
    EXPORT void host_##name(int64_t gx, int64_t gy, const void *x, void *out, int64_t R,         \
                            int64_t C, int64_t B, int64_t x_ss, uint32_t seed,                   \
                            uint32_t noise_id, uint32_t step, uint32_t first_sample,             \
                            uint32_t data_offset) {                                              \
        SPAR_FOR_GRID(gx, gy)                                                                    \
        spar_sign_mul_thread(x, out, R, C, B, x_ss, seed, noise_id, step, first_sample,          \
                             data_offset, t, DT);                                                \
    }
HOST_SIGN(spar_sign_mul_f32, SPAR_F32)
HOST_SIGN(spar_sign_mul_f16, SPAR_F16)
HOST_SIGN(spar_sign_mul_bf16, SPAR_BF16)

EXPORT void host_spar_philox(int64_t gx, int64_t gy, const uint32_t *ctr, const uint32_t *key,
                             uint32_t *out, int64_t n) {
    SPAR_FOR_GRID(gx, gy)
    spar_philox_thread(ctr, key, out, n, t);
}

/* The conversions, elementwise, for the tests to compare with torch's casts. */
EXPORT void host_f32_to_f16(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        out[i] = spar_f32_to_f16(x[i]);
    }
}

EXPORT void host_f32_to_bf16(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        out[i] = spar_f32_to_bf16(x[i]);
    }
}

EXPORT void host_f16_to_f32(const uint16_t *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        out[i] = spar_f16_to_f32(x[i]);
    }
}
