// Helpers shared by the mma.sp kernels (mma_sp.cu: activations straight from global memory;
// mma_sp_tiled.cu and mma_sp_skinny.cu: activations and weights staged in shared memory). Header-only, internal linkage.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ uint32_t lop_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;  // (a & mask) | magic in one instruction
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 bits_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }
__device__ __forceinline__ uint32_t b2_bits(__nv_bfloat162 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __nv_bfloat162 bits_b2(uint32_t u) { return *reinterpret_cast<__nv_bfloat162*>(&u); }

// One mma.sp m16n8k32 with fp32 accumulate. SEL (sparsity selector) says which lane pair of each
// quad supplies the metadata: 0 = T0/T1, 1 = T2/T3 (mma_sp_layout.py pairs k-tiles that way).
template <bool BF16, int SEL>
__device__ __forceinline__ void mma_sp(float c[4], const uint32_t a[4], const uint32_t b[4], uint32_t e) {
  if constexpr (!BF16) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
          "n"(SEL));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
          "n"(SEL));
  }
}

// ---- Staging (shared memory, cp.async, ldmatrix) and the A-operand dequantization, shared by the
// tiled kernel (mma_sp_tiled.cu) and the skinny kernel (mma_sp_skinny.cu).

constexpr int kXStride = 272;   // bytes per staged activation row: 128 x 2 + 16 of padding

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

// ---- A operand of one k-tile and one row tile, scaled: reg 0 = row g, chunk tig; reg 1 = row g+8,
// chunk tig; reg 2 = row g, chunk 4+tig; reg 3 = row g+8, chunk 4+tig (two kept values each).
// s2 = the fp16 scales (row g, row g + 8) of this k-tile's group.

// int4, fp16: word q has the pair of reg r in nibbles r and r+4. (q & 0x000F000F) | 0x6400 is
// 1024 + c exactly; minus 1032 = c - 8 (exact); times the scale: one rounding.
__device__ __forceinline__ void a_int4_f16(uint32_t q, uint32_t s2, uint32_t a[4]) {
  const uint32_t lo_mask = 0x000F000F, hi_mask = 0x00F000F0, magic = 0x64006400;
  const __half2 k1032 = bits_h2(0x64086408), k16th = bits_h2(0x2C002C00), km72 = bits_h2(0xD480D480);
  const __half2 sg = __low2half2(bits_h2(s2)), sg8 = __high2half2(bits_h2(s2));
  const uint32_t q2 = q >> 8;
  a[0] = h2_bits(__hmul2(__hsub2(bits_h2(lop_and_or(q, lo_mask, magic)), k1032), sg));
  a[1] = h2_bits(__hmul2(__hfma2(bits_h2(lop_and_or(q, hi_mask, magic)), k16th, km72), sg8));
  a[2] = h2_bits(__hmul2(__hsub2(bits_h2(lop_and_or(q2, lo_mask, magic)), k1032), sg));
  a[3] = h2_bits(__hmul2(__hfma2(bits_h2(lop_and_or(q2, hi_mask, magic)), k16th, km72), sg8));
}

// bf16 has 8 significant bits, the fp16 scale 11: s = hi + lo with hi = bf16(s) and lo = s - hi
// (at most 3 significant bits, exact in bf16). For |c| <= 8, c * lo is exact in bf16, so
// fma(c, hi, c * lo) is c * s rounded once.
struct Bf16Scale {
  __nv_bfloat162 hi_g, hi_g8, lo_g, lo_g8;
  __device__ __forceinline__ explicit Bf16Scale(uint32_t s2) {
    const float2 s = __half22float2(bits_h2(s2));
    const __nv_bfloat162 hi = __float22bfloat162_rn(s);
    const float2 hf = __bfloat1622float2(hi);
    const __nv_bfloat162 lo = __float22bfloat162_rn(make_float2(s.x - hf.x, s.y - hf.y));
    hi_g = __low2bfloat162(hi); hi_g8 = __high2bfloat162(hi);
    lo_g = __low2bfloat162(lo); lo_g8 = __high2bfloat162(lo);
  }
};

// int4, bf16: 0x4300 | c is bf16 128 + c (c < 16), minus 136 = c - 8 exact; then the split scale.
__device__ __forceinline__ void a_int4_bf16(uint32_t q, uint32_t s2, uint32_t a[4]) {
  const uint32_t mask = 0x000F000F, magic = 0x43004300;
  const __nv_bfloat162 k136 = bits_b2(0x43084308);
  const Bf16Scale s(s2);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const __nv_bfloat162 v = __hsub2(bits_b2(lop_and_or(q >> (4 * r), mask, magic)), k136);
    const __nv_bfloat162 hi = (r & 1) ? s.hi_g8 : s.hi_g, lo = (r & 1) ? s.lo_g8 : s.lo_g;
    a[r] = b2_bits(__hfma2(v, hi, __hmul2(v, lo)));
  }
}

// int8, fp16: word c holds (row g v0, row g v1, row g+8 v0, row g+8 v1) of chunk tig (c = 0) or
// 4+tig (c = 1); bytes under 0x64 are fp16 1024 + c, minus 1152 = c - 128 (exact), times the scale.
__device__ __forceinline__ void a_int8_f16(uint32_t w0, uint32_t w1, uint32_t s2, uint32_t a[4]) {
  const uint32_t magic = 0x64646464;
  const __half2 k1152 = bits_h2(0x64806480);
  const __half2 sg = __low2half2(bits_h2(s2)), sg8 = __high2half2(bits_h2(s2));
  a[0] = h2_bits(__hmul2(__hsub2(bits_h2(prmt(w0, magic, 0x4140)), k1152), sg));
  a[1] = h2_bits(__hmul2(__hsub2(bits_h2(prmt(w0, magic, 0x4342)), k1152), sg8));
  a[2] = h2_bits(__hmul2(__hsub2(bits_h2(prmt(w1, magic, 0x4140)), k1152), sg));
  a[3] = h2_bits(__hmul2(__hsub2(bits_h2(prmt(w1, magic, 0x4342)), k1152), sg8));
}

// int8, bf16: c - 128 and (c - 128) * s are exact in fp32 (8 + 11 bits); one rounding to bf16.
__device__ __forceinline__ void a_int8_bf16(uint32_t w0, uint32_t w1, uint32_t s2, uint32_t a[4]) {
  const uint32_t magic = 0x4B000000;  // fp32 2^23 + byte
  const float off = 8388736.0f;       // 2^23 + 128
  const float2 s = __half22float2(bits_h2(s2));
  const uint32_t w[2] = {w0, w1};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const uint32_t src = w[r >> 1], b0 = (r & 1) * 2;
    const float sc = (r & 1) ? s.y : s.x;
    const float f0 = (__uint_as_float(prmt(src, magic, 0x7440 + b0)) - off) * sc;
    const float f1 = (__uint_as_float(prmt(src, magic, 0x7441 + b0)) - off) * sc;
    a[r] = b2_bits(__floats2bfloat162_rn(f0, f1));
  }
}

}  // namespace
