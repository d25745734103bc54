// SeqPool on CUDA: x (B, N, D) float32/float16/bfloat16, float32 math. Block (b, s) of a (B, S) grid takes rows
// [s * rows, (s + 1) * rows) of batch row b (S = seqpool_cuda_splits(B, N): enough blocks to fill the GPU).
// x is read from memory once, in 16-byte vectors (kVec elements) when D is a multiple of kVec, else element-wise.
// A warp handles rows n = warp, warp + kWarps, ...; its lanes own columns lane*V + j*32*V (+ 0..V-1) for chunks
// j < C, so a row is one coalesced sweep and the warp's accumulators stay in registers (C*V floats per lane).
// Forward: per row s_n = x_n . w + bias (warp all-reduce), then an online softmax: a larger s_n rescales the
// warp's (l, acc) by exp(m - s_n); warps are merged in a fixed order (deterministic) through shared memory, and
// with S > 1 the blocks' partials (max, sum, accumulators) by seqpool_combine_kernel, also in a fixed order.
// out is float32 whatever x's dtype: the backward centres on it (cct_kernels/ops/seqpool.py says why).
// Backward: per row, p_n = exp(s_n - lse), ds_n = p_n g.(x_n - out) (one sum: g.x_n - g.out would cancel),
// grad_x[n] = p_n g + ds_n w written at once, and the warp accumulates grad_w += ds_n x_n, grad_b += ds_n.
// NaN propagates as in the reference: a NaN score makes p_n NaN (never a max candidate: `s > m` is false).
// Key padding (lengths, may be nullptr): batch row b pools its first L = lengths[b] tokens; blocks loop over their
// rows below L only (a block past L does no row work), the backward writes zeros to grad_x of padded tokens, and a
// row with L = 0 gets out 0 and lse -inf (the cpu kernel's convention; the sum of exp is then 0, tested as such, so
// that a NaN sum still propagates).
#include "common.cuh"
#include "kernels.h"

namespace cct {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// V consecutive elements at p as floats; one 16-byte load when V * sizeof(T) == 16 (p then 16-byte aligned).
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = ld_f(p);
  } else {
    static_assert(V * sizeof(T) == 16, "a vector is 16 bytes");
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = ld_f(e + i);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[V]) {
  if constexpr (V == 1) {
    st_f(p, f[0]);
  } else {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < V; ++i) st_f(e + i, f[i]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

// Column of element i of chunk j of this lane; the whole V-vector is in range iff its first column < D
// (D is a multiple of V).
template <int V>
__device__ __forceinline__ int col(int lane, int j) { return j * 32 * V + lane * V; }

// This lane's C vectors of V elements of one row, as float (zeros past D). All C loads are issued before any use:
// C 16-byte loads in flight per lane.
template <typename T, int V, int C>
__device__ __forceinline__ void load_row(const T* row, int D, int lane, float (&xv)[C][V]) {
#pragma unroll
  for (int j = 0; j < C; ++j) {
    if (col<V>(lane, j) < D) load_vec<T, V>(row + col<V>(lane, j), xv[j]);
    else
#pragma unroll
      for (int i = 0; i < V; ++i) xv[j][i] = 0.f;
  }
}

// Copies `n` elements of src to shared memory as float (all threads take part; caller synchronises).
template <typename T>
__device__ __forceinline__ void stage(float* dst, const T* src, int n) {
  for (int k = threadIdx.x; k < n; k += kThreads) dst[k] = ld_f(src + k);
}

// A finished row from its max M and sum of exp L: 1 / L and lse; a row without real tokens (L = 0) gets zeros and
// lse -inf (L == 0 tested, not L > 0: a NaN sum propagates).
__device__ __forceinline__ float row_inv(float L) { return L == 0.f ? 0.f : 1.f / L; }
__device__ __forceinline__ float row_lse(float M, float L) { return L == 0.f ? -INFINITY : M + logf(L); }

// With part == nullptr (S == 1) the block writes out and lse; else part[(b * S + s) * (D + 2) + ...] = its max,
// its sum of exp(score - max), then its D accumulators (relative to that max), for seqpool_combine_kernel.
template <typename T, int V, int C>
__global__ void __launch_bounds__(kThreads) seqpool_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                               const T* __restrict__ bias,
                                                               const int64_t* __restrict__ lengths,
                                                               float* __restrict__ out, float* __restrict__ lse,
                                                               float* __restrict__ part, int N, int D, int rows) {
  extern __shared__ float smem[];  // w (D floats), the merged accumulator (D floats)
  float* sw = smem;
  float* sacc = smem + D;
  __shared__ float sm[kWarps], sl[kWarps];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  stage(sw, w, D);
  for (int k = threadIdx.x; k < D; k += kThreads) sacc[k] = 0.f;
  __syncthreads();
  const T* xb = x + (int64_t)b * N * D;
  const float b0 = ld_f(bias);
  float m = -INFINITY, l = 0.f, acc[C][V];
#pragma unroll
  for (int j = 0; j < C; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[j][i] = 0.f;
  const int n0 = (int)blockIdx.y * rows, n_end = min(real_tokens(lengths, b, N), n0 + rows);  // its real rows
  for (int n = n0 + warp; n < n_end; n += kWarps) {
    float xv[C][V], s = 0.f;
    load_row<T, V, C>(xb + (int64_t)n * D, D, lane, xv);
#pragma unroll
    for (int j = 0; j < C; ++j)
      if (col<V>(lane, j) < D)
#pragma unroll
        for (int i = 0; i < V; ++i) s += xv[j][i] * sw[col<V>(lane, j) + i];
    s = warp_sum(s) + b0;  // the same value in every lane: the branch below is warp-uniform
    if (s > m) {
      const float r = __expf(m - s);  // m = -inf on the first row: r = 0, and l, acc are 0
      l *= r;
#pragma unroll
      for (int j = 0; j < C; ++j)
#pragma unroll
        for (int i = 0; i < V; ++i) acc[j][i] *= r;
      m = s;
    }
    const float p = __expf(s - m);
    l += p;
#pragma unroll
    for (int j = 0; j < C; ++j)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[j][i] += p * xv[j][i];
  }
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
  __syncthreads();
  float M = -INFINITY;
  for (int v = 0; v < kWarps; ++v) M = fmaxf(M, sm[v]);
  float L = 0.f;
  for (int v = 0; v < kWarps; ++v) L += sl[v] == 0.f ? 0.f : sl[v] * __expf(sm[v] - M);  // warps without rows: 0
  const float r = l == 0.f ? 0.f : __expf(m - M);
  for (int v = 0; v < kWarps; ++v) {  // warp v adds its rescaled accumulator; a fixed order, so fixed bits
    if (warp == v)
#pragma unroll
      for (int j = 0; j < C; ++j)
        if (col<V>(lane, j) < D)
#pragma unroll
          for (int i = 0; i < V; ++i) sacc[col<V>(lane, j) + i] += r * acc[j][i];
    __syncthreads();
  }
  if (part != nullptr) {
    float* dst = part + ((int64_t)b * gridDim.y + blockIdx.y) * (D + 2);
    for (int k = threadIdx.x; k < D; k += kThreads) dst[2 + k] = sacc[k];
    if (threadIdx.x == 0) {
      dst[0] = M;
      dst[1] = L;
    }
    return;
  }
  const float inv = row_inv(L);
  for (int k = threadIdx.x; k < D; k += kThreads) st_f(out + (int64_t)b * D + k, sacc[k] * inv);
  if (threadIdx.x == 0) lse[b] = row_lse(M, L);
}

// out[b] and lse[b] from the S partials of batch row b (one block per row, threads over D; splits in order).
__global__ void __launch_bounds__(256) seqpool_combine_kernel(const float* __restrict__ part, float* __restrict__ out,
                                                              float* __restrict__ lse, int S, int D) {
  const int b = blockIdx.x;
  const float* row = part + (int64_t)b * S * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, row[(int64_t)s * (D + 2)]);
  float L = 0.f;
  for (int s = 0; s < S; ++s) {
    const float l = row[(int64_t)s * (D + 2) + 1];
    L += l == 0.f ? 0.f : l * __expf(row[(int64_t)s * (D + 2)] - M);
  }
  const float inv = row_inv(L);
  for (int k = threadIdx.x; k < D; k += 256) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      const float* p = row + (int64_t)s * (D + 2);
      acc += p[1] == 0.f ? 0.f : p[2 + k] * __expf(p[0] - M);
    }
    st_f(out + (int64_t)b * D + k, acc * inv);
  }
  if (threadIdx.x == 0) lse[b] = row_lse(M, L);
}

// Backward CTAs per SM asked of ptxas by accumulators per lane (V * C): 4, 3, 2, 1 for 4, 8, 16, 32 (<= 32, 40,
// 64, 128 registers). Without it the length-dependent row loop of the key-padding change took 40 -> 50 registers
// at V * C = 8 (3 -> 2 CTAs/SM) and 32 -> 40 at 4 (4 -> 3); with it none spills.
constexpr int bwd_min_blocks(int per_lane) { return per_lane <= 4 ? 4 : per_lane <= 8 ? 3 : per_lane <= 16 ? 2 : 1; }

template <typename T, int V, int C>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks(V * C))
    seqpool_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ w,
                       const T* __restrict__ bias, const float* __restrict__ out, const float* __restrict__ lse,
                       const int64_t* __restrict__ lengths, T* __restrict__ gx, float* __restrict__ gw_rows,
                       float* __restrict__ gb_rows, int N, int D, int rows) {
  extern __shared__ float smem[];  // w, g, out, the merged grad_w (D floats each)
  float* sw = smem;
  float* sg = smem + D;
  float* so = smem + 2 * D;
  float* sgw = smem + 3 * D;
  __shared__ float sdb[kWarps];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* xb = x + (int64_t)b * N * D;
  T* gxb = gx + (int64_t)b * N * D;
  const int n0 = (int)blockIdx.y * rows, n_end = min(N, n0 + rows);  // this block's rows
  const int real_end = min(real_tokens(lengths, b, N), n_end);  // and the real ones among them
  // Padded tokens have no weight, so no gradient (first: this loop before the row loop keeps the registers down).
  for (int n = max(n0, real_end) + warp; n < n_end; n += kWarps) {
    const float zeros[V] = {};
#pragma unroll
    for (int j = 0; j < C; ++j)
      if (col<V>(lane, j) < D) store_vec<T, V>(gxb + (int64_t)n * D + col<V>(lane, j), zeros);
  }
  stage(sw, w, D);
  stage(sg, g + (int64_t)b * D, D);
  stage(so, out + (int64_t)b * D, D);
  for (int k = threadIdx.x; k < D; k += kThreads) sgw[k] = 0.f;
  __syncthreads();
  const float b0 = ld_f(bias), lb = lse[b];
  float db = 0.f, gwa[C][V];
#pragma unroll
  for (int j = 0; j < C; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) gwa[j][i] = 0.f;
  for (int n = n0 + warp; n < real_end; n += kWarps) {
    float xv[C][V], s = 0.f, cd = 0.f;
    load_row<T, V, C>(xb + (int64_t)n * D, D, lane, xv);
#pragma unroll
    for (int j = 0; j < C; ++j)
      if (col<V>(lane, j) < D)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int k = col<V>(lane, j) + i;
          s += xv[j][i] * sw[k];
          cd += sg[k] * (xv[j][i] - so[k]);
        }
    s = warp_sum(s);
    cd = warp_sum(cd);
    const float p = __expf(s + b0 - lb), ds = p * cd;
    db += ds;
#pragma unroll
    for (int j = 0; j < C; ++j)
      if (col<V>(lane, j) < D) {
        float gv[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int k = col<V>(lane, j) + i;
          gv[i] = p * sg[k] + ds * sw[k];
          gwa[j][i] += ds * xv[j][i];
        }
        store_vec<T, V>(gxb + (int64_t)n * D + col<V>(lane, j), gv);
      }
  }
  if (lane == 0) sdb[warp] = db;  // db is the same in every lane of a warp
  for (int v = 0; v < kWarps; ++v) {  // fixed merge order: the same bits every run
    if (warp == v)
#pragma unroll
      for (int j = 0; j < C; ++j)
        if (col<V>(lane, j) < D)
#pragma unroll
          for (int i = 0; i < V; ++i) sgw[col<V>(lane, j) + i] += gwa[j][i];
    __syncthreads();
  }
  const int64_t prow = (int64_t)b * gridDim.y + blockIdx.y;  // this block's partial row
  for (int k = threadIdx.x; k < D; k += kThreads) gw_rows[prow * D + k] = sgw[k];
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int v = 0; v < kWarps; ++v) total += sdb[v];
    gb_rows[prow] = total;
  }
}

template <int V, int C>
struct Width {  // the kernel instantiation: V elements per vector, C vectors (chunks) per lane
  static constexpr int kV = V, kC = C;
};

// Calls launch(Width<V, C>{}) with V = 16-byte vectors when D allows them and x, grad_x are 16-byte aligned (else
// V = 1), and the smallest C in {1, 2, 4, 8} covering D with C * V <= kSeqPoolMaxPerLane (more accumulators per
// lane spill at 512 threads, 128 registers). false (nothing launched) beyond: the limit seqpool_cuda_max_d states.
template <typename T, typename F>
bool dispatch_width(int64_t D, const void* a, const void* b, F&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  if (D % kVec == 0 && aligned) {
    const int64_t chunks = (D + 32 * kVec - 1) / (32 * kVec);
    if (chunks <= 1) launch(Width<kVec, 1>{});
    else if (chunks <= 2) launch(Width<kVec, 2>{});
    else if (chunks <= 4) launch(Width<kVec, 4>{});
    else if constexpr (kVec == 4) {  // float32 only: 8 x 4 floats = kSeqPoolMaxPerLane
      if (chunks > 8) return false;
      launch(Width<4, 8>{});
    } else {
      return false;
    }
    return true;
  }
  const int64_t chunks = (D + 31) / 32;
  if (chunks <= 4) launch(Width<1, 4>{});
  else if (chunks <= 8) launch(Width<1, 8>{});
  else return false;
  return true;
}

// Shared memory: 2 (forward) or 4 (backward) x D floats <= 4 x 1024 x 4 bytes = 16 KB: under the 48 KB default.
template <typename T>
cudaError_t launch_fwd(const void* x, const void* w, const void* bias, const int64_t* lengths, float* out, float* lse,
                       float* part, int64_t B, int64_t N, int64_t D, cudaStream_t stream) {
  const int64_t S = seqpool_cuda_splits(B, N), rows = (N + S - 1) / S;
  const size_t smem = 2 * D * sizeof(float);
  const dim3 grid((unsigned)B, (unsigned)S);
  float* partials = S > 1 ? part : nullptr;
  const bool ok = dispatch_width<T>(D, x, x, [&](auto width) {
    using W = decltype(width);
    seqpool_fwd_kernel<T, W::kV, W::kC><<<grid, kThreads, smem, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias), lengths,
        out, lse, partials, (int)N, (int)D, (int)rows);
  });
  if (!ok) return cudaErrorInvalidValue;
  if (S > 1)
    seqpool_combine_kernel<<<(unsigned)B, 256, 0, stream>>>(part, out, lse, (int)S, (int)D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* g, const void* x, const void* w, const void* bias, const float* out,
                       const float* lse, const int64_t* lengths, void* gx, float* gw_rows, float* gb_rows, int64_t B,
                       int64_t N, int64_t D, cudaStream_t stream) {
  const int64_t S = seqpool_cuda_splits(B, N), rows = (N + S - 1) / S;
  const size_t smem = 4 * D * sizeof(float);
  const dim3 grid((unsigned)B, (unsigned)S);
  const bool ok = dispatch_width<T>(D, x, gx, [&](auto width) {
    using W = decltype(width);
    seqpool_bwd_kernel<T, W::kV, W::kC><<<grid, kThreads, smem, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
        out, lse, lengths, static_cast<T*>(gx), gw_rows, gb_rows, (int)N, (int)D, (int)rows);
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t seqpool_forward_cuda_launch(int dtype, const void* x, const void* weight, const void* bias,
                                        const int64_t* lengths, float* out, float* lse, float* workspace, int64_t B,
                                        int64_t N, int64_t D, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case kF32: return launch_fwd<float>(x, weight, bias, lengths, out, lse, workspace, B, N, D, stream);
    case kF16: return launch_fwd<__half>(x, weight, bias, lengths, out, lse, workspace, B, N, D, stream);
    case kBF16: return launch_fwd<__nv_bfloat16>(x, weight, bias, lengths, out, lse, workspace, B, N, D, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t seqpool_backward_cuda_launch(int dtype, const void* grad_out, const void* x, const void* weight,
                                         const void* bias, const float* out, const float* lse, const int64_t* lengths,
                                         void* grad_x, float* grad_weight_rows, float* grad_bias_rows, int64_t B,
                                         int64_t N, int64_t D, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case kF32:
      return launch_bwd<float>(grad_out, x, weight, bias, out, lse, lengths, grad_x, grad_weight_rows, grad_bias_rows,
                               B, N, D, stream);
    case kF16:
      return launch_bwd<__half>(grad_out, x, weight, bias, out, lse, lengths, grad_x, grad_weight_rows,
                                grad_bias_rows, B, N, D, stream);
    case kBF16:
      return launch_bwd<__nv_bfloat16>(grad_out, x, weight, bias, out, lse, lengths, grad_x, grad_weight_rows,
                                       grad_bias_rows, B, N, D, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cct
