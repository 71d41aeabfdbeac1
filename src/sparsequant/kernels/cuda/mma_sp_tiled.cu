// y[M, N] = x[M, K] @ W^T on the sparse tensor cores (mma.sp m16n8k32), with the activations and the
// weights of each 128-column K step staged in shared memory (Marlin-style), for 1..512+ tokens.
//
// Why (benchmarks/KERNEL_NOTES.md): the first kernel (mma_sp.cu) read every B fragment with 32-bit
// global loads right before its mma, so its time doubled with every extra 8 tokens. Here a block owns
// a tile of RTB = 8 or 16 row tiles (128 or 256 output rows) x BM tokens and walks a K range in steps of one super-tile
// (128 columns, the layout of mma_sp_layout.py, unchanged). Each step is one shared-memory "stage":
//   x   [BM tokens][128 columns] fp16/bf16, rows padded to 272 bytes so that the 8 row addresses of
//       an ldmatrix phase fall in 8 different 16-byte bank groups (272 / 16 = 17 is odd);
//   codes, metadata, scales of the 8 row tiles for this super-tile, copied as they lie in global
//       memory (each row tile's piece is contiguous there).
// All of it arrives through cp.async (16 bytes per thread, coalesced, L2-only for streamed data),
// STAGES - 1 steps ahead of the step being computed, with one barrier per step.
//
// Warps: WN along rows x WK along the 4 k-tiles of a step x WM along tokens. A warp owns WRT row
// tiles, NT n-tiles (8 tokens each) and 4 / WK k-tiles; per k-tile it dequantizes each row tile's A
// operand once, then loads each B fragment with one ldmatrix.x4 (the four 8x8 matrices are the four
// B registers: row = token, 8 consecutive k) and feeds it to WRT mma.sp, so a weight fragment is
// reused NT times and an activation fragment WRT times. With WK = 2 the two warps of a (row tiles,
// tokens) patch add their accumulators once at the end, through shared memory: twice the warps per
// block for the same registers each, which is what an issue-bound kernel at low occupancy needs
// (KERNEL_NOTES.md, session 5).
//
// The A operand is the weight itself, w = (code - zero) * scale, rounded once to the activation type
// (the code times the fp16 scale is computed exactly and rounded once: fp16 -> one HMUL2; bf16 ->
// the scale split into a bf16 head and an exact bf16 tail, one HMUL2 + one HFMA2; int8 x bf16 ->
// fp32). So the result equals a dense product with the dequantized weight in that type, accumulated
// in fp32, and no per-group fp32 bookkeeping sits in the inner loop (unlike mma_sp.cu).
//
// Split-K: when the tiles would not fill the GPU, `splits` blocks share a tile's K range. Each
// writes its fp32 partial to a workspace; the last to finish (a per-tile counter, reset by that
// block) sums the partials in split order (deterministic) and writes y. One launch, CUDA-graph safe.
#include "mma_sp_common.cuh"

namespace {

struct TiledParams {
  const uint32_t* qw;    // codes    [RT][S][32 lanes][WQ] words
  const uint32_t* meta;  // metadata [RT][S][32 lanes][2] words
  const uint32_t* sc;    // scales   [RT][S][8 row pairs][gps] half2 (row g, row g + 8)
  const void* x;         // [M][K] activations, contiguous, 16-byte aligned
  void* y;               // [M][N] output, contiguous
  float* ws;             // [splits][M][N] fp32 partials (splits > 1)
  int* cnt;              // [tiles] arrival counters, zero between launches (splits > 1)
  int M, N, K, RT, S, gps, splits;
};

// RTB = row tiles (16 rows) per block: 8 or 16 (more rows per block = fewer re-reads of the
// activation tile from L2 per weight byte, which binds the kernel from ~32 tokens on).
template <int BITS, int RTB>
struct StageShape {
  static constexpr int WQ = BITS == 4 ? 4 : 8;      // code words per lane per super-tile
  static constexpr int QW_BYTES = 32 * WQ * 4;      // one row tile's codes for one super-tile
  static constexpr int META_BYTES = 32 * 2 * 4;
  // Byte offsets inside a stage: x, then codes, metadata, scales of the 8 row tiles.
  __host__ __device__ static constexpr int x_bytes(int bm) { return bm * kXStride; }
  __host__ __device__ static constexpr int meta_off(int bm) { return x_bytes(bm) + RTB * QW_BYTES; }
  __host__ __device__ static constexpr int sc_off(int bm) { return meta_off(bm) + RTB * META_BYTES; }
  __host__ __device__ static constexpr int bytes(int bm, int gps) {
    return (sc_off(bm) + RTB * 32 * gps + 127) / 128 * 128;
  }
};

// Which thread copies what into a stage, fixed for the whole block: every piece of super-tile s + 1
// lies a fixed number of bytes after the same piece of super-tile s (activations: 256 bytes along a
// row; codes, metadata, scales: one super-tile further in the row tile's run), so the sources are
// computed once and a step costs a pointer add and the cp.async per piece. The first version
// re-derived every index per step in 64-bit math (with the other per-step work that made the kernel
// instruction-issue bound, KERNEL_NOTES.md run 15).
// Activations: chunk c = tid + j * threads is token row c / 16, columns 8 * (c % 16) of the step.
// Weights: warp w copies row tiles w, w + warps, ...: lane l the 16-byte code chunks l (and l + 32
// for int8), lanes 0-15 the metadata chunks, lanes 16.. the scale chunks.
template <int BITS, int RTB, int BM, int THREADS>
struct StageLoader {
  using SS = StageShape<BITS, RTB>;
  static constexpr int kWarps = THREADS / 32;
  static constexpr int RPW = RTB / kWarps;                   // row tiles a warp copies
  static constexpr int XC = BM * 16;                          // activation chunks per step
  static constexpr int NX = (XC + THREADS - 1) / THREADS;     // ... per thread
  static_assert(RTB % kWarps == 0 && THREADS % 16 == 0, "warps must divide the row tiles");
  static_assert(SS::QW_BYTES / 16 == 32 * (SS::WQ / 4), "one or two code chunks per lane");

  const char* x;     // first activation chunk of the next step
  uint32_t xstride;  // bytes between this thread's activation chunks (THREADS / 16 token rows)
  uint32_t xdst;     // its offset in a stage (the others follow at THREADS / 16 rows)
  uint32_t xvalid;   // bit j: chunk j exists and its token is < M
  int xlim;          // activation chunks are copied while s < xlim (their columns < K), zero-filled after
  const char* q[RPW];  // code chunk of row tile warp + h * kWarps at the next step
  const char* o[RPW];  // metadata or scale chunk of that row tile
  uint32_t qdst, odst, oadv;
  int nown;          // row tiles of this warp inside the matrix (warp-uniform)
  bool has_o;        // this lane copies a metadata or scale chunk

  __device__ __forceinline__ StageLoader(const TiledParams& p, int rt0, int nrt, int m0, int s0, int tid) {
    const int lane = tid & 31, warp = tid >> 5, kc = tid & 15;
    xstride = (uint32_t)(THREADS / 16) * (uint32_t)p.K * 2u;
    xdst = (tid >> 4) * kXStride + kc * 16;
    xlim = (p.K - kc * 8 + 127) / 128;  // K % 8 == 0: a chunk is all in or all out
    x = static_cast<const char*>(p.x) + ((size_t)(m0 + (tid >> 4)) * p.K + s0 * 128 + kc * 8) * 2;
    xvalid = 0;
#pragma unroll
    for (int j = 0; j < NX; ++j)
      if (tid + j * THREADS < XC && m0 + (tid >> 4) + j * (THREADS / 16) < p.M) xvalid |= 1u << j;
    const int SC = 2 * p.gps;  // scale chunks per row tile
    has_o = lane < 16 + SC;
    const bool is_meta = lane < 16;
    oadv = is_meta ? SS::META_BYTES : 32 * p.gps;
    qdst = SS::x_bytes(BM) + warp * SS::QW_BYTES + lane * 16;
    odst = is_meta ? SS::meta_off(BM) + warp * SS::META_BYTES + lane * 16
                   : SS::sc_off(BM) + warp * 32 * p.gps + (lane - 16) * 16;
    nown = 0;
#pragma unroll
    for (int h = 0; h < RPW; ++h) {
      const int r = warp + h * kWarps;
      if (r < nrt) nown = h + 1;
      const size_t st = (size_t)(rt0 + r) * p.S + s0;  // (row tile, super-tile) index
      q[h] = reinterpret_cast<const char*>(p.qw + st * (32 * SS::WQ)) + lane * 16;
      o[h] = is_meta ? reinterpret_cast<const char*>(p.meta + st * 64) + lane * 16
                     : reinterpret_cast<const char*>(p.sc + st * (8 * p.gps)) + (lane - 16) * 16;
    }
  }

  // Issue super-tile s into the stage at shared address `stage`, then step the sources on. Tokens
  // past M and columns past K are zero-filled (from a valid address), so padding adds nothing.
  __device__ __forceinline__ void load(uint32_t stage, int s, const void* base) {
    const bool kin = s < xlim;
#pragma unroll
    for (int j = 0; j < NX; ++j) {
      if (tid_has_x(j)) {
        const bool ok = kin && ((xvalid >> j) & 1u);
        cp_async16(stage + xdst + j * (THREADS / 16) * kXStride, ok ? x + (size_t)j * xstride : base, ok ? 16 : 0);
      }
    }
    x += 256;
#pragma unroll
    for (int h = 0; h < RPW; ++h) {
      if (h < nown) {
        const uint32_t d = stage + h * kWarps * SS::QW_BYTES;
        cp_async16(d + qdst, q[h], 16);
        if constexpr (SS::WQ == 8) cp_async16(d + qdst + 512, q[h] + 512, 16);
        if (has_o) cp_async16(stage + odst + h * kWarps * oadv, o[h], 16);  // oadv = its row-tile stride too
        q[h] += SS::QW_BYTES;
        o[h] += oadv;
      }
    }
  }
  // Chunk j of this thread exists unless the last round of chunks is partial (XC % THREADS != 0).
  __device__ __forceinline__ bool tid_has_x(int j) const {
    return XC % THREADS == 0 || j < NX - 1 || (threadIdx.x + j * THREADS < XC);
  }
};

template <int BITS, bool BF16, int WN, int WK, int WM, int WRT, int NT, int STAGES, int MINB>
struct Tiled {
  static constexpr int RTB = WN * WRT;  // row tiles per block
  static constexpr int kThreads = WN * WK * WM * 32;
  static constexpr int kMinBlocks = MINB;
  static constexpr int BM = WM * NT * 8;  // tokens per block
  static constexpr int KT = 4 / WK;       // k-tiles of a super-tile per warp
  using SS = StageShape<BITS, RTB>;
  using Loader = StageLoader<BITS, RTB, BM, kThreads>;
  static_assert(RTB == 8 || RTB == 16, "a block covers 8 or 16 row tiles");
  // WK = 2: warp wk takes k-tiles 2wk, 2wk + 1, which share metadata word wk (selectors 0 and 1).
  static_assert(WK == 1 || WK == 2, "k-tiles split over 1 or 2 warps");

  // The warp's mma.sp for its k-tiles of one staged super-tile.
  static __device__ __forceinline__ void compute_stage(const char* stage, uint32_t stage_s, int gps, int wn, int wk,
                                                       int wm, int nvalid, int lane, float acc[WRT][NT][4]) {
    constexpr int QPW = SS::WQ / WK;  // code words of this warp's k-tiles per lane (kt-major)
    const int g = lane >> 2;
    uint32_t q[WRT][QPW], e[WRT][2 / WK];
#pragma unroll
    for (int i = 0; i < WRT; ++i) {
      const int r = wn * WRT + i;
      const uint32_t* qp = reinterpret_cast<const uint32_t*>(stage + SS::x_bytes(BM) + r * SS::QW_BYTES) +
                           lane * SS::WQ + wk * QPW;
      if constexpr (QPW % 4 == 0) {
#pragma unroll
        for (int h = 0; h < QPW / 4; ++h) {
          const uint4 v = reinterpret_cast<const uint4*>(qp)[h];
          q[i][4 * h] = v.x; q[i][4 * h + 1] = v.y; q[i][4 * h + 2] = v.z; q[i][4 * h + 3] = v.w;
        }
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(qp);
        q[i][0] = v.x; q[i][1] = v.y;
      }
      const uint32_t* mp = reinterpret_cast<const uint32_t*>(stage + SS::meta_off(BM) + r * SS::META_BYTES) + lane * 2;
      if constexpr (WK == 1) {
        const uint2 m = *reinterpret_cast<const uint2*>(mp);
        e[i][0] = m.x; e[i][1] = m.y;
      } else {
        e[i][0] = mp[wk];
      }
    }
    const uint32_t* scp = reinterpret_cast<const uint32_t*>(stage + SS::sc_off(BM));
    // ldmatrix: lane l gives the address of row (l & 7) of matrix (l >> 3) = tokens of the n-tile,
    // columns kt * 32 + 8 * (l >> 3) .. + 7; matrix j lands in B register j as mma.sp wants it
    // (register j of lane (g, tig) = x[token g][kt * 32 + 8 j + 2 tig, + 1]).
    const uint32_t xaddr = stage_s + (wm * NT * 8 + (lane & 7)) * kXStride + (lane >> 3) * 16 + wk * KT * 64;
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      // The A fragments of all row tiles first, then one B fragment at a time feeding every row
      // tile: fewer registers live than holding NT B fragments (matters at NT = 8).
      const int slot = ((wk * KT + t) * gps) >> 2;  // scale group of this k-tile inside the super-tile
      uint32_t a[WRT][4];
#pragma unroll
      for (int i = 0; i < WRT; ++i) {
        if (i < nvalid) {  // warp-uniform: row tiles past the matrix hold no data, skip them
          const uint32_t s2 = scp[((wn * WRT + i) * 8 + g) * gps + slot];
          if constexpr (BITS == 4) {
            if constexpr (BF16) a_int4_bf16(q[i][t], s2, a[i]);
            else a_int4_f16(q[i][t], s2, a[i]);
          } else {
            if constexpr (BF16) a_int8_bf16(q[i][2 * t], q[i][2 * t + 1], s2, a[i]);
            else a_int8_f16(q[i][2 * t], q[i][2 * t + 1], s2, a[i]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t b[4];
        ldmatrix_x4(b, xaddr + j * 8 * kXStride + t * 64);
#pragma unroll
        for (int i = 0; i < WRT; ++i) {
          if (i < nvalid) {
            // k-tiles 2j' and 2j'+1 share a metadata word: selector 0 reads T0/T1, 1 reads T2/T3.
            if (t & 1) mma_sp<BF16, 1>(acc[i][j], a[i], b, e[i][t >> 1]);
            else mma_sp<BF16, 0>(acc[i][j], a[i], b, e[i][t >> 1]);
          }
        }
      }
    }
  }

  static __device__ __forceinline__ void store(const TiledParams& p, size_t o, float v) {
    if constexpr (BF16) reinterpret_cast<__nv_bfloat16*>(p.y)[o] = __float2bfloat16_rn(v);
    else reinterpret_cast<__half*>(p.y)[o] = __float2half_rn(v);
  }

  // Calls f(offset into y, accumulator) for each of this warp's accumulators that lies inside the
  // output: accumulator (i, j, r) is output row (rt0 + wn*WRT + i)*16 + g + 8*(r >> 1), token
  // m0 + (wm*NT + j)*8 + 2*tig + (r & 1). The one place that maps fragments to outputs (the store
  // of y or of a split-K partial, and the split-K fix-up, go through it).
  template <class F>
  static __device__ __forceinline__ void for_each_output(const TiledParams& p, int rt0, int m0, int wn, int wm,
                                                         int nvalid, int lane, const float (&acc)[WRT][NT][4], F&& f) {
    const int g = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int i = 0; i < WRT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = (rt0 + wn * WRT + i) * 16 + g + 8 * (r >> 1);
          const int tok = m0 + (wm * NT + j) * 8 + 2 * tig + (r & 1);
          if (i < nvalid && row < p.N && tok < p.M) f((size_t)tok * p.N + row, acc[i][j][r]);
        }
  }

  // The kernel body (a __global__ function cannot be a member: tiled_kernel below calls this).
  static __device__ __forceinline__ void run(const TiledParams& p, char* smem, int& s_last) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wn = warp % WN, wk = (warp / WN) % WK, wm = warp / (WN * WK);
    // Block -> (row block, token block, split); consecutive blocks share a row block, so the token
    // blocks of one weight tile run together and read it from L2.
    const int m_blocks = (p.M + BM - 1) / BM;
    const int sp = blockIdx.x % p.splits;
    const int tile = blockIdx.x / p.splits;
    const int mb = tile % m_blocks, rb = tile / m_blocks;
    const int rt0 = rb * RTB, m0 = mb * BM;
    const int nrt = min(RTB, p.RT - rt0);
    int nvalid = nrt - wn * WRT;  // this warp's row tiles inside the matrix (may be <= 0)
    const int s_begin = (int)(((long)p.S * sp) / p.splits), s_end = (int)(((long)p.S * (sp + 1)) / p.splits);
    const int n_st = s_end - s_begin;
    const int stage_bytes = SS::bytes(BM, p.gps);
    const uint32_t smem_s = smem_addr(smem);

    Loader ld(p, rt0, nrt, m0, s_begin, tid);

    float acc[WRT][NT][4];
#pragma unroll
    for (int i = 0; i < WRT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    // Pipeline: stage i % STAGES holds super-tile s_begin + i; STAGES - 1 in flight ahead. Every
    // step commits one (possibly empty) group, so wait_group<STAGES - 2> means "step i has landed".
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i < n_st) ld.load(smem_s + i * stage_bytes, s_begin + i, p.x);
      cp_async_commit();
    }
#pragma unroll 1
    for (int i = 0; i < n_st; ++i) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // step i visible to all; every warp is done with step i - 1's buffer
      const int nx = i + STAGES - 1;
      if (nx < n_st) ld.load(smem_s + (nx % STAGES) * stage_bytes, s_begin + nx, p.x);
      cp_async_commit();
      const int buf = i % STAGES;
      compute_stage(smem + buf * stage_bytes, smem_s + buf * stage_bytes, p.gps, wn, wk, wm, nvalid, lane, acc);
    }
    cp_async_wait<0>();

    if constexpr (WK > 1) {
      // The k-tile halves of a (row tiles, tokens) patch meet in shared memory; warp wk = 0 adds
      // the other half (always in this order: deterministic) and alone goes on to the output.
      constexpr int NW = WN * WM * 32;
      float* red = reinterpret_cast<float*>(smem);
      const int slot = (wm * WN + wn) * 32 + lane;
      __syncthreads();  // every warp is done with the stages
      if (wk == 1) {
#pragma unroll
        for (int i = 0; i < WRT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) red[((i * NT + j) * 4 + r) * NW + slot] = acc[i][j][r];
      }
      __syncthreads();
      if (wk == 0) {
#pragma unroll
        for (int i = 0; i < WRT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] += red[((i * NT + j) * 4 + r) * NW + slot];
      } else {
        nvalid = 0;
      }
    }

    // y directly (one block per tile), or an fp32 partial and the fix-up by the tile's last block.
    const size_t MN = (size_t)p.M * p.N;
    const bool split = p.splits > 1;
    for_each_output(p, rt0, m0, wn, wm, nvalid, lane, acc, [&](size_t o, float v) {
      if (split) __stcg(p.ws + sp * MN + o, v);
      else store(p, o, v);
    });
    if (!split) return;
    __threadfence();  // partials visible device-wide before this block is counted
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(p.cnt + tile, 1) == p.splits - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // see the other blocks' partials
    for_each_output(p, rt0, m0, wn, wm, nvalid, lane, acc, [&](size_t o, float) {
      float v = 0.f;
      for (int q = 0; q < p.splits; ++q) v += __ldcg(p.ws + q * MN + o);  // fixed order: deterministic
      store(p, o, v);
    });
    if (tid == 0) p.cnt[tile] = 0;  // ready for the next launch (graph replays included)
  }

  static int smem_bytes(int gps) {
    const int stages = STAGES * SS::bytes(BM, gps);
    const int red = WK > 1 ? WN * WM * 32 * WRT * NT * 4 * 4 : 0;
    return stages > red ? stages : red;
  }
};

template <class T>
__global__ void __launch_bounds__(T::kThreads, T::kMinBlocks) tiled_kernel(TiledParams p) {
  extern __shared__ __align__(128) char smem[];
  __shared__ int s_last;
  T::run(p, smem, s_last);
}

// Blocks of configuration T that fit on one SM (0 on error).
template <class T>
int occupancy(int gps) {
  if (cudaFuncSetAttribute(tiled_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, T::smem_bytes(4)) != cudaSuccess)
    return 0;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, tiled_kernel<T>, T::kThreads, T::smem_bytes(gps)) != cudaSuccess)
    return 0;
  return n;
}

template <class T>
cudaError_t launch_tiled(const TiledParams& p, cudaStream_t stream) {
  static thread_local int attr_set_dev = -1;  // the dynamic shared-memory limit is raised per device
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (attr_set_dev != dev) {
    err = cudaFuncSetAttribute(tiled_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, T::smem_bytes(4));
    if (err != cudaSuccess) return err;
    attr_set_dev = dev;
  }
  const long tiles = (long)((p.RT + T::RTB - 1) / T::RTB) * ((p.M + T::BM - 1) / T::BM);
  tiled_kernel<T><<<(unsigned)(tiles * p.splits), T::kThreads, T::smem_bytes(p.gps), stream>>>(p);
  return cudaGetLastError();
}

// The launch configurations ("tiles"), by index: <WN, WK, WM, WRT, NT, STAGES, MINB>. Row tiles per
// block RTB = WN * WRT (8 or 16, i.e. 128 or 256 rows); tokens per block BM = 8 * WM * NT; warps =
// WN (row tiles) x WK (k-tile halves) x WM (token groups); MINB = blocks per SM the register budget
// is capped for (__launch_bounds__). kernels/mma_sp.py mirrors (BM, RTB) in TILES for its planner
// and checks them against sq_mma_sp_tile_info / sq_mma_sp_tile_rows. Registers (ptxas, int4 fp16):
// 64, 80 (4 bytes spilled), 126, 78, 128. Measured and dropped (KERNEL_NOTES.md, runs 17-18): a
// 2 x 8 n-tile warp tile (~250 registers, 1 block per SM), 128 x 64 and 256 x 16 / 256 x 64 tiles
// (never the fastest), 6-8 stages (first version, run 15).
constexpr int kNumTiles = 5;

template <int BITS, bool BF16, typename F>
auto with_tile(int tile, F&& f) {
  switch (tile) {
    case 0: return f(Tiled<BITS, BF16, 4, 2, 1, 2, 1, 4, 4>{});  // 128 rows x 8 tokens, 8 warps (k-tile halves)
    case 1: return f(Tiled<BITS, BF16, 4, 2, 1, 2, 2, 4, 3>{});  // 128 x 16, 8 warps (k-tile halves)
    case 2: return f(Tiled<BITS, BF16, 4, 2, 1, 2, 4, 4, 2>{});  // 128 x 32, 8 warps (k-tile halves)
    case 3: return f(Tiled<BITS, BF16, 4, 1, 1, 2, 1, 4, 6>{});  // 128 x 8, 4 warps (first version's tile 0)
    default: return f(Tiled<BITS, BF16, 8, 1, 1, 2, 4, 4, 2>{});  // 256 x 32, 8 warps
  }
}

template <typename F>
auto with_kernel(int bits, int bf16, int tile, F&& f) {
  if (bits == 4) return bf16 ? with_tile<4, true>(tile, f) : with_tile<4, false>(tile, f);
  return bf16 ? with_tile<8, true>(tile, f) : with_tile<8, false>(tile, f);
}

}  // namespace

extern "C" {

// Tokens per block and threads of tile configuration `tile`; returns 0, or -1 for an unknown tile.
int sq_mma_sp_tile_info(int tile, int* bm, int* threads) {
  if (tile < 0 || tile >= kNumTiles) return -1;
  with_tile<4, false>(tile, [&](auto t) {
    *bm = decltype(t)::BM;
    *threads = decltype(t)::kThreads;
    return 0;
  });
  return 0;
}

// Row tiles (16 rows) per block of tile configuration `tile`, or -1 for an unknown tile.
int sq_mma_sp_tile_rows(int tile) {
  if (tile < 0 || tile >= kNumTiles) return -1;
  return with_tile<4, false>(tile, [](auto t) { return decltype(t)::RTB; });
}

// Blocks of this kernel that fit on one SM and the SM count (for choosing splits); a cudaError_t.
int sq_mma_sp_tiled_occupancy(int bits, int bf16, int gps, int tile, int* blocks_per_sm, int* sms) {
  if ((bits != 4 && bits != 8) || tile < 0 || tile >= kNumTiles || (gps != 1 && gps != 2 && gps != 4))
    return (int)cudaErrorInvalidValue;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return (int)err;
  *blocks_per_sm = with_kernel(bits, bf16, tile, [&](auto t) { return occupancy<decltype(t)>(gps); });
  return *blocks_per_sm > 0 ? 0 : (int)cudaErrorInvalidConfiguration;
}

// Returns a cudaError_t (0 = launched). ws: splits * M * N floats and cnt: one zeroed int per
// (row block, token block), both needed only when splits > 1. x must be 16-byte aligned.
int sq_mma_sp_tiled(const void* qw, const void* meta, const void* sc, const void* x, void* y, float* ws, int* cnt,
                    int M, int N, int K, int RT, int S, int bits, int bf16, int gps, int tile, int splits,
                    void* stream) {
  if ((bits != 4 && bits != 8) || tile < 0 || tile >= kNumTiles || (gps != 1 && gps != 2 && gps != 4))
    return (int)cudaErrorInvalidValue;
  if (M <= 0 || N <= 0 || K <= 0 || K % 8 || RT != (N + 15) / 16 || S != (K + 127) / 128) return (int)cudaErrorInvalidValue;
  if (splits < 1 || splits > S || (splits > 1 && (ws == nullptr || cnt == nullptr))) return (int)cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % 16) return (int)cudaErrorMisalignedAddress;
  TiledParams p{static_cast<const uint32_t*>(qw), static_cast<const uint32_t*>(meta), static_cast<const uint32_t*>(sc),
                x, y, ws, cnt, M, N, K, RT, S, gps, splits};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return (int)with_kernel(bits, bf16, tile, [&](auto t) { return launch_tiled<decltype(t)>(p, s); });
}
}
