/*
 * spar_cuda.cuh -- the work of one thread of each of spar's CUDA kernels (spar_cuda.cu), as
 * __host__ __device__ functions in the common subset of C and CUDA C++.
 *
 * A kernel in spar_cuda.cu is a thin __global__ wrapper: it computes its thread index and
 * calls one *_thread function below with the kernel's own arguments and a constant dtype
 * code. spar_cuda_host.c compiles this same file for the CPU and runs the *_thread
 * functions over every index of a launch grid, so the tests check, without a GPU, the
 * numbers this code computes (tests/ops/test_cuda_host.py).
 *
 * Noise: philox.h (the one copy of Philox4x32-10 and Box-Muller that the CPU library uses
 * too). Element (row, col) of global sample s draws lane col % 4 of Philox(counter =
 * (col / 4, row, s, step), key = (seed, param_id)), see spar/rng.py. Every thread owns a
 * group of 4 consecutive columns of one row, so one Philox call gives all 4 of its normals
 * (no output of a call is discarded) and a group never straddles two threads.
 *
 * Storage dtypes: fp32, fp16 and bf16 (codes SPAR_F32, SPAR_F16, SPAR_BF16); arithmetic is
 * fp32. The kernels pass the code as a constant, so the switch folds away. Conversions
 * round to nearest even: by the cvt instructions on the GPU (bf16: sm_80 and later), by the
 * bit arithmetic below elsewhere (the tests compare it with torch's casts).
 *
 * Indices are int64 (a weight or activation may exceed 2**31 elements); the noise counters
 * are uint32 and wrap as in spar.rng. Loops over a group's columns have the constant bound
 * 4 (and j < n): unrolled, their arrays stay in registers rather than local memory.
 */
#ifndef SPAR_CUDA_CUH_
#define SPAR_CUDA_CUH_

#include "philox.h"

#define SPAR_F32 0
#define SPAR_F16 1
#define SPAR_BF16 2

/* the floor under lrt's variance before its square root (spar.ops.library.VAR_FLOOR) */
#define SPAR_VAR_FLOOR 1e-30f

/* flags of spar_sample_bwd_thread */
#define SPAR_BWD_HAS_MU 1    /* write grad_mu = sum_s g_s */
#define SPAR_BWD_ACCUMULATE 2 /* add to the existing grad_mu / grad_eps instead of overwriting */
#define SPAR_BWD_SIGMOID 4    /* finish grad_eps into grad_rho = sigmoid(rho) * grad_eps */

#ifndef NULL
#define NULL 0
#endif

/* ---------------------------------------------------------------- dtype conversions */

SPAR_FN float spar_bf16_to_f32(uint16_t h) { return spar_as_float((uint32_t)h << 16); }

SPAR_FN uint16_t spar_f32_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    uint16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    uint32_t b = spar_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((b >> 16) | 0x40u); /* NaN stays a quiet NaN */
    }
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
#endif
}

SPAR_FN float spar_f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t m = (uint32_t)h & 0x3ffu;
    if (e == 0x1fu) {
        return spar_as_float(sign | 0x7f800000u | (m << 13)); /* inf, NaN */
    }
    if (e != 0) {
        return spar_as_float(sign | ((e + 112u) << 23) | (m << 13));
    }
    /* zero or subnormal: m * 2**-24, exact in fp32 */
    return spar_as_float(sign | spar_as_uint((float)m * 5.9604644775390625e-8f));
#endif
}

SPAR_FN uint16_t spar_f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    uint32_t b = spar_as_uint(f);
    uint32_t sign = (b >> 16) & 0x8000u;
    uint32_t a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return (uint16_t)(sign | 0x7e00u); /* NaN */
    }
    if (a >= 0x477ff000u) {
        return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    }
    if (a >= 0x38800000u) { /* a normal half: rebias the exponent, round the mantissa */
        uint32_t m = a - 0x38000000u;
        return (uint16_t)(sign | ((m + 0xfffu + ((m >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) {
        return (uint16_t)sign; /* <= 2**-25: rounds to zero (the tie goes to even 0) */
    }
    /* a half subnormal: round(value / 2**-24) = round(mant * 2**(e - 126)), shift >= 14 */
    uint32_t e = a >> 23;
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;
    uint32_t r = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) {
        ++r;
    }
    return (uint16_t)(sign | r);
#endif
}

SPAR_FN float spar_load(const void *p, int64_t i, int dt) {
    switch (dt) {
    case SPAR_F16:
        return spar_f16_to_f32(((const uint16_t *)p)[i]);
    case SPAR_BF16:
        return spar_bf16_to_f32(((const uint16_t *)p)[i]);
    default:
        return ((const float *)p)[i];
    }
}

SPAR_FN void spar_store(void *p, int64_t i, float v, int dt) {
    switch (dt) {
    case SPAR_F16:
        ((uint16_t *)p)[i] = spar_f32_to_f16(v);
        break;
    case SPAR_BF16:
        ((uint16_t *)p)[i] = spar_f32_to_bf16(v);
        break;
    default:
        ((float *)p)[i] = v;
    }
}

/* ---------------------------------------------------------------- thread geometry */

/* a / b for 0 <= a and 0 < b: in 32 bits when both fit (a 64-bit division is a long
 * software routine on the GPU, and these run once per thread) */
SPAR_FN int64_t spar_div(int64_t a, int64_t b) {
    if (((a | b) >> 31) == 0) {
        return (int64_t)((uint32_t)a / (uint32_t)b);
    }
    return a / b;
}

/* Thread t of a launch over a (rows, cols) array owns row t / groups, columns
 * [4 g, 4 g + n) with g = t % groups, groups = ceil(cols / 4), n = min(4, cols - 4 g).
 * Returns n, 0 for a thread past the end. */
SPAR_FN int spar_group(int64_t t, int64_t rows, int64_t cols, int64_t *row, int64_t *col0) {
    int64_t groups = (cols + 3) >> 2;
    if (t < 0 || t >= rows * groups) {
        return 0;
    }
    *row = spar_div(t, groups);
    *col0 = (t - *row * groups) << 2;
    return cols - *col0 < 4 ? (int)(cols - *col0) : 4;
}

SPAR_FN void spar_f32x4_get(spar_f32x4 v, float out[4]) {
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
}

/* ---------------------------------------------------------------- weight sampling */

/* out[s, r, c] = mu[r, c] + sig[r, c] * eps(sample = first_sample + s, row = first_row + r)
 * for the samples s in [y * spt, min(ns, (y + 1) * spt)) of the thread's group (see
 * spar_group). mu NULL: zero mean; sig NULL: 1 (the normals themselves: eps is written
 * exactly). out (ns, rows, cols) in dtype dt; mu, sig (rows, cols) fp32; all contiguous.
 * The group's mu and sig are read once and reused for its spt samples. */
SPAR_FN void spar_sample_thread(void *out, const float *mu, const float *sig, int64_t rows,
                                int64_t cols, int64_t ns, int64_t spt, uint32_t seed,
                                uint32_t pid, uint32_t step, uint32_t first_sample,
                                uint32_t first_row, int64_t t, int64_t y, int dt) {
    int64_t r = 0, c0 = 0;
    int n = spar_group(t, rows, cols, &r, &c0);
    if (n == 0) {
        return;
    }
    /* without mu / sig: w = 1 * eps + (-0) = eps exactly (-0 keeps the sign of a zero), so
     * every case runs the same branch-free arithmetic */
    float m[4] = {-0.0f, -0.0f, -0.0f, -0.0f};
    float sg[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    int64_t base = r * cols + c0;
    for (int j = 0; j < 4 && j < n; ++j) {
        if (mu != NULL) {
            m[j] = mu[base + j];
        }
        if (sig != NULL) {
            sg[j] = sig[base + j];
        }
    }
    int64_t s_end = (y + 1) * spt < ns ? (y + 1) * spt : ns;
    for (int64_t s = y * spt; s < s_end; ++s) {
        float e[4];
        spar_f32x4_get(spar_normal4((uint32_t)(c0 >> 2), first_row + (uint32_t)r,
                                    first_sample + (uint32_t)s, step, seed, pid),
                       e);
        int64_t o = s * rows * cols + base;
        for (int j = 0; j < 4 && j < n; ++j) {
            spar_store(out, o + j, sg[j] * e[j] + m[j], dt);
        }
    }
}

/* The backward of spar_sample_thread (first_row 0) over all ns samples, in sample order:
 * acc_mu = sum_s g[s], acc_eps = sum_s g[s] * eps_s with eps regenerated, then
 *   geps = acc_eps (+ geps with SPAR_BWD_ACCUMULATE), times sigmoid(rho) with SPAR_BWD_SIGMOID;
 *   gmu  = acc_mu  (+ gmu  with SPAR_BWD_ACCUMULATE), written with SPAR_BWD_HAS_MU.
 * g (ns, rows, cols) in dtype dt; rho, gmu, geps (rows, cols) fp32; all contiguous. A
 * thread owns its elements and walks the samples itself: deterministic, no atomics. */
SPAR_FN void spar_sample_bwd_thread(const void *g, const float *rho, float *gmu, float *geps,
                                    int64_t rows, int64_t cols, int64_t ns, uint32_t seed,
                                    uint32_t pid, uint32_t step, uint32_t first_sample,
                                    int flags, int64_t t, int dt) {
    int64_t r = 0, c0 = 0;
    int n = spar_group(t, rows, cols, &r, &c0);
    if (n == 0) {
        return;
    }
    float acc_mu[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float acc_eps[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t base = r * cols + c0;
    for (int64_t s = 0; s < ns; ++s) {
        float e[4];
        spar_f32x4_get(spar_normal4((uint32_t)(c0 >> 2), (uint32_t)r, first_sample + (uint32_t)s,
                                    step, seed, pid),
                       e);
        int64_t o = s * rows * cols + base;
        for (int j = 0; j < 4 && j < n; ++j) {
            float gv = spar_load(g, o + j, dt);
            acc_mu[j] += gv;
            acc_eps[j] += gv * e[j];
        }
    }
    for (int j = 0; j < 4 && j < n; ++j) {
        float ge = acc_eps[j];
        if (flags & SPAR_BWD_ACCUMULATE) {
            ge += geps[base + j];
        }
        if (flags & SPAR_BWD_SIGMOID) {
            ge = ge / (1.0f + expf(-rho[base + j]));
        }
        geps[base + j] = ge;
        if (flags & SPAR_BWD_HAS_MU) {
            float gm = acc_mu[j];
            if (flags & SPAR_BWD_ACCUMULATE) {
                gm += gmu[base + j];
            }
            gmu[base + j] = gm;
        }
    }
}

/* ---------------------------------------------------------------- per-example noise */

/* The noise of per-example estimators (lrt, flipout) over a folded (R, C) array: row rr is
 * example b = rr % B of local sample s = rr / B, and draws eps(sample = first_sample + s,
 * row = data_offset + b). The input is (S or 1, B, C) contiguous with sample stride
 * in_ss (B * C, or 0 when one batch is shared by every sample), the output (R, C)
 * contiguous. Sets *s_out, *in_base (the input offset of the group) and eps; returns n. */
SPAR_FN int spar_example_group(int64_t t, int64_t R, int64_t C, int64_t B, int64_t in_ss,
                               uint32_t seed, uint32_t noise_id, uint32_t step,
                               uint32_t first_sample, uint32_t data_offset, int64_t *out_base,
                               int64_t *in_base, float e[4]) {
    int64_t rr = 0, c0 = 0;
    int n = spar_group(t, R, C, &rr, &c0);
    if (n == 0) {
        return 0;
    }
    int64_t s = spar_div(rr, B), b = rr - s * B;
    spar_f32x4_get(spar_normal4((uint32_t)(c0 >> 2), data_offset + (uint32_t)b,
                                first_sample + (uint32_t)s, step, seed, noise_id),
                   e);
    *out_base = rr * C + c0;
    *in_base = s * in_ss + b * C + c0;
    return n;
}

/* lrt: forward out = sqrt(max(var, VAR_FLOOR)) * eps; backward (dy non-NULL, (R, C) in
 * dtype dt_in) out = dy * eps / (2 sqrt(var)) where var >= VAR_FLOOR, else 0. var in
 * dtype dt_in, out in dt_out. A NaN variance stays NaN. */
SPAR_FN void spar_lrt_noise_thread(const void *var, const void *dy, void *out, int64_t R,
                                   int64_t C, int64_t B, int64_t var_ss, uint32_t seed,
                                   uint32_t noise_id, uint32_t step, uint32_t first_sample,
                                   uint32_t data_offset, int64_t t, int dt_in, int dt_out) {
    int64_t ob = 0, ib = 0;
    float e[4];
    int n = spar_example_group(t, R, C, B, var_ss, seed, noise_id, step, first_sample,
                               data_offset, &ob, &ib, e);
    for (int j = 0; j < 4 && j < n; ++j) {
        float v = spar_load(var, ib + j, dt_in);
        float sd = sqrtf(v < SPAR_VAR_FLOOR ? SPAR_VAR_FLOOR : v);
        float o;
        if (dy == NULL) {
            o = sd * e[j];
        } else {
            o = v >= SPAR_VAR_FLOOR ? spar_load(dy, ob + j, dt_in) * e[j] / (2.0f * sd) : 0.0f;
        }
        spar_store(out, ob + j, o, dt_out);
    }
}

/* flipout's sign flip: out = x where eps >= 0, else -x (its own transpose: also the
 * backward). x in dtype dt with sample stride x_ss, out (R, C) in dt. */
SPAR_FN void spar_sign_mul_thread(const void *x, void *out, int64_t R, int64_t C, int64_t B,
                                  int64_t x_ss, uint32_t seed, uint32_t noise_id, uint32_t step,
                                  uint32_t first_sample, uint32_t data_offset, int64_t t,
                                  int dt) {
    int64_t ob = 0, ib = 0;
    float e[4];
    int n = spar_example_group(t, R, C, B, x_ss, seed, noise_id, step, first_sample,
                               data_offset, &ob, &ib, e);
    for (int j = 0; j < 4 && j < n; ++j) {
        float v = spar_load(x, ib + j, dt);
        spar_store(out, ob + j, e[j] >= 0.0f ? v : -v, dt);
    }
}

/* ---------------------------------------------------------------- raw integers */

/* out[i] = Philox4x32-10(ctr[i], key[i]) for i = t: ctr (n, 4), key (n, 2), out (n, 4)
 * uint32. The bit-exactness check of the GPU generator against spar.rng. */
SPAR_FN void spar_philox_thread(const uint32_t *ctr, const uint32_t *key, uint32_t *out,
                                int64_t n, int64_t t) {
    if (t < 0 || t >= n) {
        return;
    }
    spar_u32x4 v = spar_philox4x32_10(ctr[4 * t], ctr[4 * t + 1], ctr[4 * t + 2],
                                      ctr[4 * t + 3], key[2 * t], key[2 * t + 1]);
    out[4 * t] = v.x;
    out[4 * t + 1] = v.y;
    out[4 * t + 2] = v.z;
    out[4 * t + 3] = v.w;
}

#endif /* SPAR_CUDA_CUH_ */
