// Philox4x32-10 counter-based RNG and the mapping from (seed, offset, element index) to a standard
// normal sample. Header-only and dependency-free so the CPU kernel, the CUDA kernel and (by mirroring
// this file line for line) the Triton kernel draw the same noise; ddim_fast/reference.py mirrors it in numpy.
//
// Noise streams. rng_state is int64 and comes in two shapes:
//   [2]    = (seed, offset): ONE stream over the whole tensor. Element i (the logical row-major index in x's
//            shape; strides do not matter) is element j = i of that stream.
//   [B, 2] = one (seed_b, offset_b) per batch row b = 0 .. B-1: row b is a stream of its own. Element i is
//            element j = i - b * sample_numel of stream b, b = i / sample_numel (sample_numel = numel / B).
//            So a sample's noise is a function of its own seed_b, offset_b, the table row and j only, never of b
//            or B: the same seed row draws the same noise as row 0 of a batch of 1 or as row 5 of a batch of 8.
//            A [1, 2] state draws exactly what the [2] state with the same values draws.
//
// Within a stream (seed, offset), element j, at table row `table_row` (the op's `row` argument):
//   key      = (lo32(seed), hi32(seed))
//   counter  = (lo32(g), hi32(g), lo32(o), hi32(o))   with g = j >> 2 and o = offset + table_row (mod 2^64)
//   (r0, r1, r2, r3) = Philox4x32-10(counter, key)
//   u(r)     = (r >> 8) * 2^-24                        in [0, 1), exact in fp32 (24 bits)
//   radius(r)= sqrt(-2 ln(u(r) + 2^-24))               u + 2^-24 in (0, 1], so the log is finite
//   angle(r) = 2*pi * u(r)
//   z[4g+0] = radius(r0) * cos(angle(r1))    z[4g+1] = radius(r0) * sin(angle(r1))
//   z[4g+2] = radius(r2) * cos(angle(r3))    z[4g+3] = radius(r2) * sin(angle(r3))
// Groups of 4 belong to one stream: in [B, 2] mode they never straddle two rows. When sample_numel % 4 != 0
// the last group of each row is partial and its unused normals are dropped (the next row starts at g = 0 of
// its own stream). In [2] mode a group may straddle two samples, as it always has.
// `table_row` is read on the device, so a replayed CUDA graph draws fresh noise every step without host work, and
// the (seed, offset) rows are read on the device too (a graph may capture them; update them in place).
// The integers (r0..r3, u) are bit-identical across backends; the normals agree to fp32 rounding of
// log/sqrt/sin/cos, which differ by an ulp or two between libm, CUDA's libdevice and Triton.
#pragma once

#include <cstdint>
#include <cmath>

#include "ddim_fast/macros.h"

namespace ddim_fast {

struct Philox4 {
  uint32_t r[4];
};

// Random123's constants for Philox4x32.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPi = 6.28318530717958647692f;
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24

DDIM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DDIM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                              uint32_t k1) {
  // Ten rounds; the key is bumped between rounds (nine bumps), as in Random123.
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4 out;
  out.r[0] = c0;
  out.r[1] = c1;
  out.r[2] = c2;
  out.r[3] = c3;
  return out;
}

DDIM_HD float philox_uniform(uint32_t r) { return static_cast<float>(r >> 8) * kTwoPow24Inv; }

// Box-Muller on one pair of words: writes two independent standard normals.
DDIM_HD void box_muller(uint32_t r_radius, uint32_t r_angle, float* z_cos, float* z_sin) {
  const float radius = sqrtf(-2.0f * logf(philox_uniform(r_radius) + kTwoPow24Inv));
  const float angle = kTwoPi * philox_uniform(r_angle);
  *z_cos = radius * cosf(angle);
  *z_sin = radius * sinf(angle);
}

// The four normals of group g = i >> 2 (elements 4g .. 4g+3).
DDIM_HD void philox_normal4(uint64_t seed, uint64_t offset, uint64_t group, float z[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                  static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(r.r[0], r.r[1], &z[0], &z[1]);
  box_muller(r.r[2], r.r[3], &z[2], &z[3]);
}

// The (seed, offset + table_row) of noise stream `stream` (a batch row) of a [B, 2] rng_state (0 for a [2] state).
DDIM_HD void philox_stream(const int64_t* rng, int64_t stream, uint64_t table_row, uint64_t* seed,
                           uint64_t* offset) {
  *seed = static_cast<uint64_t>(rng[2 * stream]);
  *offset = static_cast<uint64_t>(rng[2 * stream + 1]) + table_row;
}

}  // namespace ddim_fast
