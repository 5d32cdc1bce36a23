/*
 * philox.h -- the noise key of spar (invariant I1) as plain C, for the CPU library
 * (spar_cpu.c) and for the CUDA kernels (spar_cuda.cuh / spar_cuda.cu, compiled by NVRTC
 * or nvcc: every function is __host__ __device__ there). Built with FMA contraction off
 * (gcc -ffp-contract=off, NVRTC --fmad=false), the CPU and GPU normals are the same bits.
 *
 * eps[seed, step, param_id, sample, row, col] is lane col % 4 of
 *
 *     Philox4x32-10(counter = (col / 4, row, sample, step), key = (seed, param_id))
 *
 * with the four 32-bit outputs (i0, i1, i2, i3) turned into four normals exactly as
 * spar.rng and Triton's tl.randn4x do: u = uint_to_uniform(i), then Box-Muller on
 * (u0, u1) -> (n0, n1) and (u2, u3) -> (n2, n3).
 *
 * Integers are bit-exact with spar.rng.philox, Random123 and tl.philox. The normals use
 * the portable float32 logf / sincosf below (Taylor polynomials with exact range
 * reduction, about 1 ulp) instead of a libm: they vectorise, need no library, and give
 * the same bits on every IEEE-754 machine as long as the compiler does not contract a*b+c
 * into fma (spar_cpu.c is built with -ffp-contract=off). Against torch's log/sin/cos
 * (Sleef on CPU) the normals differ by a few ulp; tests/test_native.py measures it.
 *
 * Domain notes: spar_logf is for positive normal floats (Box-Muller clamps u1 >= 1e-7);
 * spar_sincosf_small is for |theta| <= ~100 (Box-Muller passes theta in [0, 2 pi)).
 */
#ifndef SPAR_PHILOX_H_
#define SPAR_PHILOX_H_

#if defined(__CUDACC_RTC__)
/* NVRTC (spar/ops/backends/cuda) has no system headers: the fixed-width types by hand
 * (every CUDA target is LP64 with 32-bit int) */
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif
#if !defined(__CUDACC__) && !defined(__HIPCC__)
#include <math.h> /* sqrtf */
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SPAR_FN static __host__ __device__ __forceinline__
#else
#define SPAR_FN static inline
#endif

/* Philox4x32 constants (Random123) */
#define SPAR_PHILOX_KEY_A 0x9E3779B9u
#define SPAR_PHILOX_KEY_B 0xBB67AE85u
#define SPAR_PHILOX_ROUND_A 0xD2511F53u
#define SPAR_PHILOX_ROUND_B 0xCD9E8D57u
#define SPAR_PHILOX_ROUNDS 10

/* Triton's uint_to_uniform_float scale and Box-Muller constants, as float32 */
#define SPAR_UNIFORM_SCALE 4.6566127342e-10f
#define SPAR_U_MIN 1.0e-7f
#define SPAR_TWO_PI 6.2831853071795864769f

typedef struct {
    uint32_t x, y, z, w;
} spar_u32x4;

typedef struct {
    float x, y, z, w;
} spar_f32x4;

SPAR_FN float spar_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    union {
        uint32_t u;
        float f;
    } c;
    c.u = u;
    return c.f;
#endif
}

SPAR_FN uint32_t spar_as_uint(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    union {
        float f;
        uint32_t u;
    } c;
    c.f = f;
    return c.u;
#endif
}

/* One Philox4x32-10 block: counter (c0, c1, c2, c3), key (k0, k1). Ten rounds of two
 * 32x32->64 multiplies; the key is bumped after every round, as in Random123. */
SPAR_FN spar_u32x4 spar_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                      uint32_t k0, uint32_t k1) {
    for (int i = 0; i < SPAR_PHILOX_ROUNDS; ++i) {
        uint64_t p0 = (uint64_t)SPAR_PHILOX_ROUND_A * (uint64_t)c0;
        uint64_t p2 = (uint64_t)SPAR_PHILOX_ROUND_B * (uint64_t)c2;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi2 = (uint32_t)(p2 >> 32), lo2 = (uint32_t)p2;
        c0 = hi2 ^ c1 ^ k0;
        c1 = lo2;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += SPAR_PHILOX_KEY_A;
        k1 += SPAR_PHILOX_KEY_B;
    }
    spar_u32x4 r = {c0, c1, c2, c3};
    return r;
}

/* Triton's uint_to_uniform_float for 32-bit inputs: bitcast to int32, ~x where negative,
 * times 4.6566127342e-10f. Result in [0, 1). */
SPAR_FN float spar_uint_to_uniform(uint32_t x) {
    uint32_t y = x ^ (0u - (x >> 31)); /* ~x when the sign bit is set: y < 2**31 */
    return (float)(int32_t)y * SPAR_UNIFORM_SCALE;
}

/* Natural log of a positive normal float, about 1 ulp. x = 2**k * (1 + f) with
 * 1 + f in [sqrt(1/2), sqrt(2)); log(1 + f) = 2 atanh(s), s = f / (2 + f), written as
 * f - (f^2/2 - s (f^2/2 + R(s^2))) so that the leading term f is exact; R is the Taylor
 * series of 2 atanh(s)/s - 2 up to s^8 (truncation error < 3e-9 relative for |s| < 0.172).
 * ln 2 is split so that k * LN2_HI is exact. */
SPAR_FN float spar_logf(float x) {
    const float ln2_hi = 0.693145751953125f;   /* 0x3f317200 */
    const float ln2_lo = 1.428606765330187e-6f; /* ln 2 - ln2_hi */
    uint32_t ix = spar_as_uint(x) + (0x3f800000u - 0x3f3504f3u);
    int32_t k = (int32_t)(ix >> 23) - 127;
    float f = spar_as_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f; /* exact */
    float s = f / (2.0f + f);
    float z = s * s;
    float R = z * (0.66666666666666667f +
                   z * (0.4f + z * (0.28571428571428571f + z * 0.22222222222222222f)));
    float hfsq = 0.5f * f * f;
    float dk = (float)k;
    return dk * ln2_hi + (f - (hfsq - (s * (hfsq + R) + dk * ln2_lo)));
}

/* sin and cos of theta for |theta| <= ~100, about 1 ulp: theta = q pi/2 + r with the
 * nearest integer q (magic-number rounding: no libm, no rounding-mode dependence beyond
 * round-to-nearest) and a three-part pi/2 whose first two parts have trailing zero bits
 * (q * part is exact), then Taylor polynomials on |r| <= pi/4 (sin to r^9, cos to r^10,
 * truncation error < 3e-9) and the quadrant's swap and signs. */
SPAR_FN void spar_sincosf_small(float theta, float *sin_out, float *cos_out) {
    const float two_over_pi = 0.63661977236758134f;
    const float pio2_1 = 1.5703125f;                /* 0x3fc90000 */
    const float pio2_2 = 4.837512969970703125e-4f;  /* 0x39fda000 */
    const float pio2_3 = 7.549790126404332e-8f;
    const float round_magic = 12582912.0f; /* 1.5 * 2**23 */
    float qf = (theta * two_over_pi + round_magic) - round_magic;
    int32_t q = (int32_t)qf;
    float r = ((theta - qf * pio2_1) - qf * pio2_2) - qf * pio2_3;
    float r2 = r * r;
    float sr = r + r * r2 * (-0.16666666666666667f +
                             r2 * (8.3333333333333333e-3f +
                                   r2 * (-1.9841269841269841e-4f + r2 * 2.7557319223985891e-6f)));
    float cr = 1.0f - 0.5f * r2 +
               r2 * r2 *
                   (4.1666666666666667e-2f +
                    r2 * (-1.3888888888888889e-3f +
                          r2 * (2.4801587301587302e-5f + r2 * -2.7557319223985891e-7f)));
    uint32_t swap = (uint32_t)q & 1u;
    float s = swap ? cr : sr;
    float c = swap ? sr : cr;
    /* sin(q pi/2 + r): q%4 = 0: s, 1: c, 2: -s, 3: -c; cos: c, -s, -c, s */
    uint32_t sin_sign = ((uint32_t)q & 2u) << 30;
    uint32_t cos_sign = ((uint32_t)(q + 1) & 2u) << 30;
    *sin_out = spar_as_float(spar_as_uint(s) ^ sin_sign);
    *cos_out = spar_as_float(spar_as_uint(c) ^ cos_sign);
}

/* Box-Muller of two Philox integers as tl.randn4x: u1 clamped to 1e-7,
 * r = sqrt(-2 log u1), theta = u2 * 2 pi, returns (r cos theta, r sin theta). */
SPAR_FN void spar_box_muller(uint32_t a, uint32_t b, float *n0, float *n1) {
    float u1 = spar_uint_to_uniform(a);
    float u2 = spar_uint_to_uniform(b);
    /* max(u1, 1e-7) on the bit patterns (u1 >= 0): an integer max vectorises and gcc
     * does not turn it into a branch around the log */
    uint32_t u1_bits = spar_as_uint(u1);
    const uint32_t min_bits = 0x33d6bf95u; /* bits of 1e-7f */
    u1 = spar_as_float(u1_bits > min_bits ? u1_bits : min_bits);
    float r = sqrtf(-2.0f * spar_logf(u1));
    float th = u2 * SPAR_TWO_PI;
    float s, c;
    spar_sincosf_small(th, &s, &c);
    *n0 = r * c;
    *n1 = r * s;
}

/* The four normals of one counter (lanes 0..3 = columns 4*c0 .. 4*c0+3). */
SPAR_FN spar_f32x4 spar_normal4(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                uint32_t k0, uint32_t k1) {
    spar_u32x4 i = spar_philox4x32_10(c0, c1, c2, c3, k0, k1);
    spar_f32x4 n;
    spar_box_muller(i.x, i.y, &n.x, &n.y);
    spar_box_muller(i.z, i.w, &n.z, &n.w);
    return n;
}

#endif /* SPAR_PHILOX_H_ */
