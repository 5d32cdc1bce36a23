/*
 * spar_cuda.cu -- spar's CUDA kernels: weight sampling and its backward, lrt's output noise,
 * flipout's sign flip, and the raw Philox integers (a test kernel). Compiled at first use by
 * NVRTC through CuPy (spar/ops/backends/cuda/source.py inlines the includes under #line
 * directives, so errors name this file and line) with --fmad=false: no a*b+c is contracted
 * into an fma, so the normals are the bits that csrc/spar_cpu.c computes on the CPU.
 *
 * Every kernel is a __global__ wrapper around a *_thread function of spar_cuda.cuh, which the
 * host build (spar_cuda_host.c) runs on the CPU in the tests. extern "C" names: the launcher
 * looks them up by name, and ptxas -v reports them under these names.
 *
 * Launch geometry (all kernels): 1-D blocks of SPAR_BLOCK threads; thread
 * t = blockIdx.x * SPAR_BLOCK + threadIdx.x owns one group of 4 consecutive columns of one
 * row (spar_group): grid.x = ceil(rows * ceil(cols / 4) / SPAR_BLOCK). One Philox call per
 * thread and sample gives the group's 4 normals. Consecutive threads own consecutive
 * groups, so a warp reads and writes 32 * 16 contiguous bytes (fp32) per access.
 */
#include "spar_cuda.cuh"

#define SPAR_BLOCK 256
#define SPAR_T ((int64_t)blockIdx.x * SPAR_BLOCK + (int64_t)threadIdx.x)

/* Weight sampling, out[s] = mu + sig * eps_s (mu NULL: zero mean; sig NULL: eps itself,
 * the keyed normals of the `normal` primitive and per-example noise).
 * Geometry: grid.y = ceil(ns / spt); block y writes samples [y spt, (y + 1) spt), so a
 * thread reads its group's mu and sig once and writes spt samples.
 * Traffic per output element: writes 1 element (4 B fp32, 2 B fp16/bf16); reads
 * 8 B / spt (mu + sig, 4 B / spt without mu, none for the normals).
 * Work per output element: a quarter of a Philox4x32-10 call and half a Box-Muller. */
#define SPAR_SAMPLE_KERNEL(name, DT)                                                             \
    extern "C" __global__ void __launch_bounds__(SPAR_BLOCK)                                     \
        name(void *out, const float *mu, const float *sig, int64_t rows, int64_t cols,           \
             int64_t ns, int64_t spt, uint32_t seed, uint32_t pid, uint32_t step,                \
             uint32_t first_sample, uint32_t first_row) {                                        \
        spar_sample_thread(out, mu, sig, rows, cols, ns, spt, seed, pid, step, first_sample,     \
                           first_row, SPAR_T, (int64_t)blockIdx.y, DT);                          \
    }
SPAR_SAMPLE_KERNEL(spar_sample_f32, SPAR_F32)
SPAR_SAMPLE_KERNEL(spar_sample_f16, SPAR_F16)
SPAR_SAMPLE_KERNEL(spar_sample_bf16, SPAR_BF16)

/* Backward of weight sampling: grad_mu and grad_eps (-> grad_rho) reduced over the ns
 * samples of a chunk, eps regenerated. Geometry: grid.y = 1; each thread walks all ns
 * samples of its group in order (deterministic; rows * cols / 4 threads in flight).
 * Traffic per (sample, element): reads 1 element of g (4 B fp32, 2 B fp16/bf16); per
 * element, once: reads rho (4 B, on the last chunk), reads (when accumulating) and writes
 * grad_mu and grad_eps (8-16 B). */
#define SPAR_SAMPLE_BWD_KERNEL(name, DT)                                                         \
    extern "C" __global__ void __launch_bounds__(SPAR_BLOCK)                                     \
        name(const void *g, const float *rho, float *gmu, float *geps, int64_t rows,             \
             int64_t cols, int64_t ns, uint32_t seed, uint32_t pid, uint32_t step,               \
             uint32_t first_sample, int flags) {                                                 \
        spar_sample_bwd_thread(g, rho, gmu, geps, rows, cols, ns, seed, pid, step,               \
                               first_sample, flags, SPAR_T, DT);                                 \
    }
SPAR_SAMPLE_BWD_KERNEL(spar_sample_bwd_f32, SPAR_F32)
SPAR_SAMPLE_BWD_KERNEL(spar_sample_bwd_f16, SPAR_F16)
SPAR_SAMPLE_BWD_KERNEL(spar_sample_bwd_bf16, SPAR_BF16)

/* lrt's output noise, forward (dy NULL) and backward, over the folded (R, C) output.
 * Geometry: grid.y = 1. Traffic per element: forward reads var and writes out (1 element
 * each: 8 B fp32, 4 B fp16/bf16); backward also reads dy (12 B fp32; writing fp32 partial
 * terms for a shared input: 10 B fp16/bf16). A shared var (var_ss = 0) is read S times,
 * from L2 when it fits. Work: one normal per element, as the sampling kernel. */
#define SPAR_LRT_KERNEL(name, DT_IN, DT_OUT)                                                     \
    extern "C" __global__ void __launch_bounds__(SPAR_BLOCK)                                     \
        name(const void *var, const void *dy, void *out, int64_t R, int64_t C, int64_t B,        \
             int64_t var_ss, uint32_t seed, uint32_t noise_id, uint32_t step,                    \
             uint32_t first_sample, uint32_t data_offset) {                                      \
        spar_lrt_noise_thread(var, dy, out, R, C, B, var_ss, seed, noise_id, step,               \
                              first_sample, data_offset, SPAR_T, DT_IN, DT_OUT);                 \
    }
SPAR_LRT_KERNEL(spar_lrt_noise_f32, SPAR_F32, SPAR_F32)
SPAR_LRT_KERNEL(spar_lrt_noise_f16, SPAR_F16, SPAR_F16)
SPAR_LRT_KERNEL(spar_lrt_noise_bf16, SPAR_BF16, SPAR_BF16)
SPAR_LRT_KERNEL(spar_lrt_noise_f16_f32, SPAR_F16, SPAR_F32)
SPAR_LRT_KERNEL(spar_lrt_noise_bf16_f32, SPAR_BF16, SPAR_F32)

/* flipout's x * sign(eps) (forward and backward). Geometry: grid.y = 1. Traffic per
 * element: reads x and writes out (8 B fp32, 4 B fp16/bf16). */
#define SPAR_SIGN_KERNEL(name, DT)                                                               \
    extern "C" __global__ void __launch_bounds__(SPAR_BLOCK)                                     \
        name(const void *x, void *out, int64_t R, int64_t C, int64_t B, int64_t x_ss,            \
             uint32_t seed, uint32_t noise_id, uint32_t step, uint32_t first_sample,             \
             uint32_t data_offset) {                                                             \
        spar_sign_mul_thread(x, out, R, C, B, x_ss, seed, noise_id, step, first_sample,          \
                             data_offset, SPAR_T, DT);                                           \
    }
SPAR_SIGN_KERNEL(spar_sign_mul_f32, SPAR_F32)
SPAR_SIGN_KERNEL(spar_sign_mul_f16, SPAR_F16)
SPAR_SIGN_KERNEL(spar_sign_mul_bf16, SPAR_BF16)

/* Raw Philox integers of n (counter, key) pairs, one per thread: the GPU generator's
 * bit-exactness check. Traffic per call: reads 24 B, writes 16 B. */
extern "C" __global__ void __launch_bounds__(SPAR_BLOCK)
    spar_philox(const uint32_t *ctr, const uint32_t *key, uint32_t *out, int64_t n) {
    spar_philox_thread(ctr, key, out, n, SPAR_T);
}
