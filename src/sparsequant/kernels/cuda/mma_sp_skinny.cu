// y[M, N] = x[M, K] @ W^T for 1..8 tokens ("skinny") on the sparse tensor cores, from the mma.sp layout
// of mma_sp_layout.py, with K split over the warps of one block instead of over blocks.
//
// Why (benchmarks/KERNEL_NOTES.md, "Skinny mma.sp kernel"): at 1 token the tiled kernel's time is
// ~6.8 us + bytes / 2.7 TB/s over the LLaMA shapes (a fit to its H100 times): the bandwidth is
// fine, the fixed part is not. With 4-16 split-K blocks per 128 rows, each block streams only 2-8
// super-tiles and then waits through a chain of dependent global round trips (partial store, fence,
// atomic, the last block's reads of every partial). Here a warp owns one row tile (16 rows) x one
// K slice and the KW warps of a row tile meet in shared memory at the end: one launch, no global
// workspace, no atomics, no counters. A block = R row tiles x KW K slices (R * KW = WARPS).
//
// Each warp is its own pipeline: a ring of D shared-memory slots, each holding one super-tile (128
// columns) of its row tile - codes, metadata, scales copied as they lie in global memory, and the
// activations of those 128 columns for the M tokens (rows of 272 bytes, as in the tiled kernel) -
// filled by the warp's own cp.async, D - 1 super-tiles ahead of the one it computes. The planner
// picks KW so that a warp has at most ~8 super-tiles: with D = 8 a warp's whole slice is in flight
// at once right after the launch. Only `__syncwarp` orders the ring; the block synchronises once,
// for the reduction. Tokens past M read a shared zero row through ldmatrix, so they cost no copies.
#include "mma_sp_common.cuh"

namespace {

struct SkinnyParams {
  const uint32_t* qw;    // codes    [RT][S][32 lanes][WQ] words
  const uint32_t* meta;  // metadata [RT][S][32 lanes][2] words
  const uint32_t* sc;    // scales   [RT][S][8 row pairs][gps] half2
  const void* x;         // [M][K] activations, contiguous, 16-byte aligned, K % 8 == 0
  void* y;               // [M][N] output, contiguous
  int M, N, K, RT, S, gps, kw;
};

// Byte layout of one ring slot: codes, metadata, scales (<= 128 bytes), then M activation rows.
template <int BITS>
struct SlotShape {
  static constexpr int WQ = BITS == 4 ? 4 : 8;
  static constexpr int QW_BYTES = 32 * WQ * 4;
  static constexpr int META_OFF = QW_BYTES;
  static constexpr int SC_OFF = META_OFF + 32 * 2 * 4;
  static constexpr int X_OFF = SC_OFF + 128;
  __host__ __device__ static constexpr int bytes(int m) { return (X_OFF + m * kXStride + 127) / 128 * 128; }
};

constexpr int kZeroBytes = 256;  // one all-zero activation row (4 k-tiles x 64 bytes)

template <int BITS, bool BF16, int WARPS, int D>
struct Skinny {
  using SS = SlotShape<BITS>;
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kDepth = D;

  static int smem_bytes(int m) {
    const int ring = WARPS * D * SS::bytes(m);
    const int red = WARPS * 32 * 4 * 4;
    return kZeroBytes + (ring > red ? ring : red);
  }

  // The copies of one super-tile into a slot, by lane: code chunk `lane` (and `lane + 32` for int8),
  // lanes 0-15 the metadata chunks, lanes 16.. the 2 * gps scale chunks; activation chunk c = token
  // c / 16, columns 8 (c % 16) .. + 7, for c = lane, lane + 32, ... < 16 M (zero-filled past K).
  struct Loader {
    const char* q;
    const char* o;      // metadata or scale chunk (lanes that copy one)
    const char* x;      // activation chunk c = lane of the next super-tile
    uint32_t oadv, odst;
    int xcol;           // first column of this lane's activation chunks inside a super-tile
    int s;              // super-tile of the next load
    bool has_o;

    __device__ __forceinline__ Loader(const SkinnyParams& p, int rt, int s0, int lane) : s(s0) {
      const size_t st = (size_t)rt * p.S + s0;
      q = reinterpret_cast<const char*>(p.qw + st * (32 * SS::WQ)) + lane * 16;
      const bool is_meta = lane < 16;
      has_o = lane < 16 + 2 * p.gps;
      o = is_meta ? reinterpret_cast<const char*>(p.meta + st * 64) + lane * 16
                  : reinterpret_cast<const char*>(p.sc + st * (8 * p.gps)) + (lane - 16) * 16;
      oadv = is_meta ? 256u : 32u * p.gps;
      odst = is_meta ? SS::META_OFF + lane * 16 : SS::SC_OFF + (lane - 16) * 16;
      xcol = (lane & 15) * 8;
      x = static_cast<const char*>(p.x) + ((size_t)(lane >> 4) * p.K + (size_t)s0 * 128 + xcol) * 2;
    }

    __device__ __forceinline__ void load(const SkinnyParams& p, uint32_t slot, int lane) {
      cp_async16(slot + lane * 16, q, 16);
      if constexpr (SS::WQ == 8) cp_async16(slot + 512 + lane * 16, q + 512, 16);
      if (has_o) cp_async16(slot + odst, o, 16);
      q += SS::QW_BYTES;
      o += oadv;
      const bool kin = s * 128 + xcol < p.K;  // K % 8 == 0: a chunk is all in or all out
      // Chunk c = lane + 32 j is token (lane >> 4) + 2 j.
      for (int tok = lane >> 4, j = 0; tok < p.M; tok += 2, ++j) {
        const char* src = x + (size_t)j * 2 * p.K * 2;
        cp_async16(slot + SS::X_OFF + tok * kXStride + (lane & 15) * 16, kin ? src : q, kin ? 16 : 0);
      }
      x += 256;
      ++s;
    }
  };

  static __device__ __forceinline__ void compute(const char* slot, uint32_t slot_s, uint32_t zero_s, int M, int gps,
                                                 int lane, float acc[4]) {
    const int g = lane >> 2;
    uint32_t q[SS::WQ];
    {
      const uint4* qp = reinterpret_cast<const uint4*>(slot + lane * SS::WQ * 4);
#pragma unroll
      for (int h = 0; h < SS::WQ / 4; ++h) {
        const uint4 v = qp[h];
        q[4 * h] = v.x; q[4 * h + 1] = v.y; q[4 * h + 2] = v.z; q[4 * h + 3] = v.w;
      }
    }
    const uint2 e = *reinterpret_cast<const uint2*>(slot + SS::META_OFF + lane * 8);
    const uint32_t* scp = reinterpret_cast<const uint32_t*>(slot + SS::SC_OFF) + g * gps;
    // ldmatrix row address of this lane: token (lane & 7), 16-byte column group (lane >> 3).
    const int row = lane & 7;
    const uint32_t xaddr = (row < M ? slot_s + SS::X_OFF + row * kXStride : zero_s) + (lane >> 3) * 16;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t s2 = scp[(t * gps) >> 2];
      uint32_t a[4], b[4];
      if constexpr (BITS == 4) {
        if constexpr (BF16) a_int4_bf16(q[t], s2, a);
        else a_int4_f16(q[t], s2, a);
      } else {
        if constexpr (BF16) a_int8_bf16(q[2 * t], q[2 * t + 1], s2, a);
        else a_int8_f16(q[2 * t], q[2 * t + 1], s2, a);
      }
      ldmatrix_x4(b, xaddr + t * 64);
      const uint32_t ew = (t >> 1) ? e.y : e.x;
      if (t & 1) mma_sp<BF16, 1>(acc, a, b, ew);
      else mma_sp<BF16, 0>(acc, a, b, ew);
    }
  }

  static __device__ __forceinline__ void run(const SkinnyParams& p, char* smem) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kw = warp % p.kw, rloc = warp / p.kw, R = WARPS / p.kw;
    const int rt = blockIdx.x * R + rloc;
    const int s0 = (int)(((long)p.S * kw) / p.kw), s1 = (int)(((long)p.S * (kw + 1)) / p.kw);
    const int n = rt < p.RT ? s1 - s0 : 0;  // warp-uniform
    const int slot_bytes = SS::bytes(p.M);
    char* zero = smem;
    char* ring = smem + kZeroBytes + warp * D * slot_bytes;
    const uint32_t zero_s = smem_addr(zero), ring_s = smem_addr(ring);
    if (tid < kZeroBytes / 16) reinterpret_cast<uint4*>(zero)[tid] = make_uint4(0, 0, 0, 0);
    __syncthreads();

    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (n > 0) {
      Loader ld(p, rt, s0, lane);
#pragma unroll
      for (int i = 0; i < D - 1; ++i) {
        if (i < n) ld.load(p, ring_s + i * slot_bytes, lane);
        cp_async_commit();
      }
#pragma unroll 1
      for (int i = 0; i < n; ++i) {
        cp_async_wait<D - 2>();
        __syncwarp();  // slot i landed for every lane; every lane is done with slot i - 1
        const int nx = i + D - 1;
        if (nx < n) ld.load(p, ring_s + (nx % D) * slot_bytes, lane);
        cp_async_commit();
        const int buf = i % D;
        compute(ring + buf * slot_bytes, ring_s + buf * slot_bytes, zero_s, p.M, p.gps, lane, acc);
      }
      cp_async_wait<0>();
    }

    // Accumulator r of lane (g, tig) is row rt * 16 + g + 8 (r >> 1), token 2 tig + (r & 1).
    const int g = lane >> 2, tig = lane & 3;
    auto store = [&](const float v[4]) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = rt * 16 + g + 8 * (r >> 1), tok = 2 * tig + (r & 1);
        if (row < p.N && tok < p.M) {
          if constexpr (BF16) reinterpret_cast<__nv_bfloat16*>(p.y)[(size_t)tok * p.N + row] = __float2bfloat16_rn(v[r]);
          else reinterpret_cast<__half*>(p.y)[(size_t)tok * p.N + row] = __float2half_rn(v[r]);
        }
      }
    };
    if (p.kw == 1) {
      if (rt < p.RT) store(acc);
      return;
    }
    // The K slices of a row tile meet in shared memory (the ring is free now); slice 0 adds them
    // in slice order (deterministic) and writes y.
    float* red = reinterpret_cast<float*>(smem + kZeroBytes);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 4; ++r) red[(warp * 4 + r) * 32 + lane] = acc[r];
    __syncthreads();
    if (kw == 0 && rt < p.RT) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float v = 0.f;
        for (int k = 0; k < p.kw; ++k) v += red[((warp + k) * 4 + r) * 32 + lane];
        acc[r] = v;
      }
      store(acc);
    }
  }
};

template <class T>
__global__ void __launch_bounds__(T::kThreads) skinny_kernel(SkinnyParams p) {
  extern __shared__ __align__(128) char smem[];
  T::run(p, smem);
}

// The configurations: warps per block x ring depth (kernels/mma_sp.py mirrors them in
// SKINNY_CONFIGS; its planner picks one from the H100 sweep in benchmarks/KERNEL_NOTES.md).
constexpr int kNumSkinny = 8;

template <int BITS, bool BF16, typename F>
auto with_skinny(int cfg, F&& f) {
  switch (cfg) {
    case 0: return f(Skinny<BITS, BF16, 8, 8>{});
    case 1: return f(Skinny<BITS, BF16, 8, 4>{});
    case 2: return f(Skinny<BITS, BF16, 16, 8>{});
    case 3: return f(Skinny<BITS, BF16, 16, 4>{});
    case 4: return f(Skinny<BITS, BF16, 4, 4>{});
    case 5: return f(Skinny<BITS, BF16, 8, 2>{});
    case 6: return f(Skinny<BITS, BF16, 8, 3>{});
    default: return f(Skinny<BITS, BF16, 16, 2>{});
  }
}

template <typename F>
auto with_skinny_kernel(int bits, int bf16, int cfg, F&& f) {
  if (bits == 4) return bf16 ? with_skinny<4, true>(cfg, f) : with_skinny<4, false>(cfg, f);
  return bf16 ? with_skinny<8, true>(cfg, f) : with_skinny<8, false>(cfg, f);
}

// The dynamic shared-memory limit is raised once per device to the most a block may opt in to;
// a launch whose ring would not fit is refused (the Python planner never asks for one).
template <class T>
cudaError_t set_smem_limit(int* limit) {
  static thread_local int set_dev = -1, set_limit = 0;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (set_dev != dev) {
    int optin = 0;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(skinny_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (err != cudaSuccess) return err;
    set_dev = dev;
    set_limit = optin;
  }
  *limit = set_limit;
  return cudaSuccess;
}

}  // namespace

extern "C" {

// Warps per block and ring depth of configuration `cfg`; returns 0, or -1 for an unknown one.
int sq_mma_sp_skinny_info(int cfg, int* warps, int* depth) {
  if (cfg < 0 || cfg >= kNumSkinny) return -1;
  with_skinny<4, false>(cfg, [&](auto t) {
    *warps = decltype(t)::kThreads / 32;
    *depth = decltype(t)::kDepth;
    return 0;
  });
  return 0;
}

// Blocks of configuration `cfg` that fit on one SM for m tokens; a cudaError_t.
int sq_mma_sp_skinny_occupancy(int bits, int bf16, int cfg, int m, int* blocks_per_sm) {
  if ((bits != 4 && bits != 8) || cfg < 0 || cfg >= kNumSkinny || m < 1 || m > 8) return (int)cudaErrorInvalidValue;
  return (int)with_skinny_kernel(bits, bf16, cfg, [&](auto t) {
    using T = decltype(t);
    int limit = 0;
    cudaError_t err = set_smem_limit<T>(&limit);
    if (err != cudaSuccess) return err;
    if (T::smem_bytes(m) > limit) {
      *blocks_per_sm = 0;
      return cudaSuccess;
    }
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, skinny_kernel<T>, T::kThreads, T::smem_bytes(m));
  });
}

// Returns a cudaError_t (0 = launched). kw = warps per row tile (K slices): divides the block's
// warps (8 or 16). x must be 16-byte aligned and K a multiple of 8.
int sq_mma_sp_skinny(const void* qw, const void* meta, const void* sc, const void* x, void* y, int M, int N, int K,
                     int RT, int S, int bits, int bf16, int gps, int cfg, int kw, void* stream) {
  if ((bits != 4 && bits != 8) || cfg < 0 || cfg >= kNumSkinny || (gps != 1 && gps != 2 && gps != 4))
    return (int)cudaErrorInvalidValue;
  if (M < 1 || M > 8 || N <= 0 || K <= 0 || K % 8 || RT != (N + 15) / 16 || S != (K + 127) / 128)
    return (int)cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % 16) return (int)cudaErrorMisalignedAddress;
  SkinnyParams p{static_cast<const uint32_t*>(qw), static_cast<const uint32_t*>(meta), static_cast<const uint32_t*>(sc),
                 x, y, M, N, K, RT, S, gps, kw};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return (int)with_skinny_kernel(bits, bf16, cfg, [&](auto t) {
    using T = decltype(t);
    constexpr int W = T::kThreads / 32;
    if (kw < 1 || kw > W || W % kw) return cudaErrorInvalidValue;
    int limit = 0;
    cudaError_t err = set_smem_limit<T>(&limit);
    if (err != cudaSuccess) return err;
    if (T::smem_bytes(M) > limit) return cudaErrorInvalidConfiguration;
    const int R = W / kw;
    const unsigned blocks = (unsigned)((RT + R - 1) / R);
    skinny_kernel<T><<<blocks, T::kThreads, T::smem_bytes(M), s>>>(p);
    return cudaGetLastError();
  });
}
}
