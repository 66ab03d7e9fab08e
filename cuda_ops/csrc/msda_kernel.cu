// Multi-scale deformable attention: CUDA forward and backward (EBSeg-on-Ray, own design).
//
// Work decomposition
//   One "group" of G lanes (G a power of two, G <= 32, so a group never straddles a warp)
//   owns one output row (n, q, head).  Each lane owns V consecutive channels (V in {1,2,4},
//   chosen on the host so that V*sizeof(T) <= 16 bytes and every access is aligned), and
//   loops when the head width D exceeds G*V.
//   * Per sample the lanes of a group read the same location/weight (one broadcast
//     transaction) and compute the bilinear corner weights once; the corner values are then
//     gathered as contiguous V-wide packs, so a group reads D*sizeof(T) contiguous bytes per
//     corner.
//   * All arithmetic is float32 whatever the storage type (float, half, bfloat16).
//   * Backward: the value gradient is scattered with atomicAdd into a float32 buffer
//     (vector float2/float4 atomics on sm_90+); the location and attention-weight gradients
//     are dot products over channels, reduced across the group with warp shuffles and written
//     once by the group's first lane (no atomics, no shared memory).
//
// Coordinates follow F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) applied to grid = 2*loc - 1: pixel = ((grid + 1) * size - 1) / 2,
// i.e. loc*size - 0.5; corners outside the image contribute zero.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

// Only c10/ATen core headers: ATen/cuda/CUDAContext.h would drag in cuBLAS/cuSPARSE headers
// that minimal CUDA toolkits (nvcc + cudart) do not ship.
#include <algorithm>
#include <vector>

namespace ebseg_msda {

constexpr int kBlock = 256;

// float32, float16 and bfloat16 storage; float64 stays on the PyTorch path (we accumulate in
// float32, which would defeat the point of float64).
#define EBSEG_MSDA_DISPATCH(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)        \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T x[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<float>(pk.x[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.x[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <int V>
__device__ __forceinline__ void atomic_add_pack(float* p, const float (&v)[V]) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  // sm_90 has native float2/float4 atomics on global memory: one instruction per pack.
  if constexpr (V == 4) {
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  } else if constexpr (V == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(v[0], v[1]));
  } else {
    atomicAdd(p, v[0]);
  }
#else
#pragma unroll
  for (int i = 0; i < V; ++i) atomicAdd(p + i, v[i]);
#endif
}

// Bilinear footprint of one sample on one level.
struct Footprint {
  int tok[4];    // token index inside the level (y*W + x) of nw, ne, sw, se; -1 if outside
  float cw[4];   // corner weights nw, ne, sw, se
  float ax, ay;  // x - x0, y - y0
  float bx, by;  // x1 - x, y1 - y
};

// Returns false when no corner is inside the image (the sample is exactly zero).
__device__ __forceinline__ bool make_footprint(float lx, float ly, int H, int W, Footprint& f) {
  const float gx = 2.f * lx - 1.f;
  const float gy = 2.f * ly - 1.f;
  const float x = ((gx + 1.f) * W - 1.f) * 0.5f;
  const float y = ((gy + 1.f) * H - 1.f) * 0.5f;
  if (!(x > -1.f && y > -1.f && x < static_cast<float>(W) && y < static_cast<float>(H))) {
    return false;
  }
  const float fx0 = floorf(x);
  const float fy0 = floorf(y);
  const int x0 = static_cast<int>(fx0);
  const int y0 = static_cast<int>(fy0);
  const int x1 = x0 + 1;
  const int y1 = y0 + 1;
  f.ax = x - fx0;
  f.ay = y - fy0;
  f.bx = (fx0 + 1.f) - x;
  f.by = (fy0 + 1.f) - y;
  f.cw[0] = f.bx * f.by;
  f.cw[1] = f.ax * f.by;
  f.cw[2] = f.bx * f.ay;
  f.cw[3] = f.ax * f.ay;
  const bool in_x0 = x0 >= 0, in_x1 = x1 < W, in_y0 = y0 >= 0, in_y1 = y1 < H;
  f.tok[0] = (in_x0 && in_y0) ? y0 * W + x0 : -1;
  f.tok[1] = (in_x1 && in_y0) ? y0 * W + x1 : -1;
  f.tok[2] = (in_x0 && in_y1) ? y1 * W + x0 : -1;
  f.tok[3] = (in_x1 && in_y1) ? y1 * W + x1 : -1;
  return true;
}

struct Dims {
  int64_t rows;  // N * Q * M  (one output row per (n, q, head))
  int S, M, D, Q, L, P;
  int group;     // lanes per row
};

template <typename T, int V>
__global__ void __launch_bounds__(kBlock) msda_forward_kernel(
    const T* __restrict__ value,            // [N, S, M, D]
    const int64_t* __restrict__ shapes,     // [L, 2] (H, W)
    const int64_t* __restrict__ starts,     // [L]
    const float* __restrict__ loc,          // [N, Q, M, L, P, 2]
    const float* __restrict__ attn,         // [N, Q, M, L, P]
    T* __restrict__ out,                    // [N, Q, M, D]
    const Dims d) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = tid / d.group;
  if (row >= d.rows) return;  // no cross-lane traffic in the forward pass
  const int lane = static_cast<int>(tid % d.group);
  const int m = static_cast<int>(row % d.M);
  const int64_t n = row / (static_cast<int64_t>(d.M) * d.Q);
  const int LP = d.L * d.P;
  const float* lp = loc + row * LP * 2;
  const float* ap = attn + row * LP;
  const int64_t tok_stride = static_cast<int64_t>(d.M) * d.D;
  const T* vrow = value + (n * d.S * d.M + m) * static_cast<int64_t>(d.D);
  T* orow = out + row * d.D;

  for (int c = lane * V; c < d.D; c += d.group * V) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    for (int l = 0; l < d.L; ++l) {
      const int H = static_cast<int>(shapes[2 * l]);
      const int W = static_cast<int>(shapes[2 * l + 1]);
      const T* vlev = vrow + starts[l] * tok_stride + c;
      for (int p = 0; p < d.P; ++p) {
        const int k = l * d.P + p;
        Footprint f;
        if (!make_footprint(lp[2 * k], lp[2 * k + 1], H, W, f)) continue;
        float s[V];
#pragma unroll
        for (int i = 0; i < V; ++i) s[i] = 0.f;
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (f.tok[corner] < 0) continue;
          float v[V];
          load_pack<T, V>(vlev + f.tok[corner] * tok_stride, v);
#pragma unroll
          for (int i = 0; i < V; ++i) s[i] += f.cw[corner] * v[i];
        }
        const float w = ap[k];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += s[i] * w;
      }
    }
    store_pack<T, V>(orow + c, acc);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock) msda_backward_kernel(
    const T* __restrict__ value,            // [N, S, M, D]
    const int64_t* __restrict__ shapes,     // [L, 2]
    const int64_t* __restrict__ starts,     // [L]
    const float* __restrict__ loc,          // [N, Q, M, L, P, 2]
    const float* __restrict__ attn,         // [N, Q, M, L, P]
    const T* __restrict__ grad_out,         // [N, Q, M, D]
    float* __restrict__ grad_value,         // [N, S, M, D], float32, zero-initialised
    float* __restrict__ grad_loc,           // [N, Q, M, L, P, 2]
    float* __restrict__ grad_attn,          // [N, Q, M, L, P]
    const Dims d) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = tid / d.group;
  // Rows start on group boundaries, so a whole group leaves together and the shuffles
  // below only ever involve lanes of one live group.
  if (row >= d.rows) return;
  const int lane = static_cast<int>(tid % d.group);
  const unsigned lane_in_warp = threadIdx.x & 31u;
  const unsigned group_mask =
      d.group == 32 ? 0xffffffffu
                    : (((1u << d.group) - 1u) << (lane_in_warp & ~static_cast<unsigned>(d.group - 1)));
  const int m = static_cast<int>(row % d.M);
  const int64_t n = row / (static_cast<int64_t>(d.M) * d.Q);
  const int LP = d.L * d.P;
  const float* lp = loc + row * LP * 2;
  const float* ap = attn + row * LP;
  float* glp = grad_loc + row * LP * 2;
  float* gap = grad_attn + row * LP;
  const int64_t tok_stride = static_cast<int64_t>(d.M) * d.D;
  const int64_t vrow_off = (n * d.S * d.M + m) * static_cast<int64_t>(d.D);
  const T* vrow = value + vrow_off;
  float* gvrow = grad_value + vrow_off;
  const T* gorow = grad_out + row * d.D;

  for (int l = 0; l < d.L; ++l) {
    const int H = static_cast<int>(shapes[2 * l]);
    const int W = static_cast<int>(shapes[2 * l + 1]);
    const int64_t lev_off = starts[l] * tok_stride;
    for (int p = 0; p < d.P; ++p) {
      const int k = l * d.P + p;
      Footprint f;
      if (!make_footprint(lp[2 * k], lp[2 * k + 1], H, W, f)) {  // uniform within the group
        if (lane == 0) {
          glp[2 * k] = 0.f;
          glp[2 * k + 1] = 0.f;
          gap[k] = 0.f;
        }
        continue;
      }
      const float w = ap[k];
      float dot_s = 0.f, dot_dx = 0.f, dot_dy = 0.f;  // this lane's share of g.s, g.ds/dx, g.ds/dy
      for (int c = lane * V; c < d.D; c += d.group * V) {
        float g[V];
        load_pack<T, V>(gorow + c, g);
        float v[4][V];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (f.tok[corner] >= 0) {
            load_pack<T, V>(vrow + lev_off + f.tok[corner] * tok_stride + c, v[corner]);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) v[corner][i] = 0.f;
          }
        }
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float s = f.cw[0] * v[0][i] + f.cw[1] * v[1][i] + f.cw[2] * v[2][i] + f.cw[3] * v[3][i];
          const float ds_dx = f.by * (v[1][i] - v[0][i]) + f.ay * (v[3][i] - v[2][i]);
          const float ds_dy = f.bx * (v[2][i] - v[0][i]) + f.ax * (v[3][i] - v[1][i]);
          dot_s += g[i] * s;
          dot_dx += g[i] * ds_dx;
          dot_dy += g[i] * ds_dy;
        }
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (f.tok[corner] < 0) continue;
          const float scale = w * f.cw[corner];
          float upd[V];
#pragma unroll
          for (int i = 0; i < V; ++i) upd[i] = scale * g[i];
          atomic_add_pack<V>(gvrow + lev_off + f.tok[corner] * tok_stride + c, upd);
        }
      }
      for (int off = d.group >> 1; off > 0; off >>= 1) {
        dot_s += __shfl_xor_sync(group_mask, dot_s, off, d.group);
        dot_dx += __shfl_xor_sync(group_mask, dot_dx, off, d.group);
        dot_dy += __shfl_xor_sync(group_mask, dot_dy, off, d.group);
      }
      if (lane == 0) {
        // pixel = loc * size - 0.5, so d pixel / d loc = size.
        glp[2 * k] = w * dot_dx * static_cast<float>(W);
        glp[2 * k + 1] = w * dot_dy * static_cast<float>(H);
        gap[k] = dot_s;
      }
    }
  }
}

namespace {

int pick_vector_width(int D, int elem_size, const std::vector<const void*>& ptrs) {
  for (int v : {4, 2}) {
    if (v * elem_size > 16 || D % v != 0) continue;
    bool aligned = true;
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(v * elem_size) != 0) aligned = false;
    }
    if (aligned) return v;
  }
  return 1;
}

int pick_group(int D, int V) {
  const int chunks = (D + V - 1) / V;
  int g = 1;
  while (g < chunks && g < 32) g <<= 1;
  return g;
}

Dims make_dims(const at::Tensor& value, const at::Tensor& loc, int group) {
  Dims d;
  d.S = static_cast<int>(value.size(1));
  d.M = static_cast<int>(value.size(2));
  d.D = static_cast<int>(value.size(3));
  d.Q = static_cast<int>(loc.size(1));
  d.L = static_cast<int>(loc.size(3));
  d.P = static_cast<int>(loc.size(4));
  d.rows = value.size(0) * static_cast<int64_t>(d.Q) * d.M;
  d.group = group;
  return d;
}

unsigned blocks_for(const Dims& d) {
  const int64_t threads = d.rows * d.group;
  const int64_t blocks = (threads + kBlock - 1) / kBlock;
  TORCH_CHECK(blocks <= 0x7fffffffLL, "ms_deform_attn: problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace

at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                             const at::Tensor& starts, const at::Tensor& loc,
                             const at::Tensor& attn) {
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::empty({value.size(0), loc.size(1), value.size(2) * value.size(3)}, value.options());
  if (out.numel() == 0) return out;
  const int D = static_cast<int>(value.size(3));
  const int V = pick_vector_width(D, static_cast<int>(value.element_size()),
                                  {value.data_ptr(), out.data_ptr()});
  const Dims d = make_dims(value, loc, pick_group(D, V));
  const unsigned blocks = blocks_for(d);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  EBSEG_MSDA_DISPATCH(value.scalar_type(), "msda_forward", [&] {
    const auto* vp = value.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    const auto* sp = shapes.data_ptr<int64_t>();
    const auto* st = starts.data_ptr<int64_t>();
    const auto* lp = loc.data_ptr<float>();
    const auto* ap = attn.data_ptr<float>();
    switch (V) {
      case 4:
        msda_forward_kernel<scalar_t, 4><<<blocks, kBlock, 0, stream>>>(vp, sp, st, lp, ap, op, d);
        break;
      case 2:
        msda_forward_kernel<scalar_t, 2><<<blocks, kBlock, 0, stream>>>(vp, sp, st, lp, ap, op, d);
        break;
      default:
        msda_forward_kernel<scalar_t, 1><<<blocks, kBlock, 0, stream>>>(vp, sp, st, lp, ap, op, d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> msda_backward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                                           const at::Tensor& starts, const at::Tensor& loc,
                                           const at::Tensor& attn, const at::Tensor& grad_out) {
  const c10::cuda::CUDAGuard guard(value.device());
  auto grad_value32 = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_loc.numel() > 0 && value.numel() > 0) {
    const int D = static_cast<int>(value.size(3));
    const int V = pick_vector_width(D, static_cast<int>(value.element_size()),
                                    {value.data_ptr(), grad_out.data_ptr()});
    const Dims d = make_dims(value, loc, pick_group(D, V));
    const unsigned blocks = blocks_for(d);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    EBSEG_MSDA_DISPATCH(value.scalar_type(), "msda_backward", [&] {
      const auto* vp = value.data_ptr<scalar_t>();
      const auto* gp = grad_out.data_ptr<scalar_t>();
      const auto* sp = shapes.data_ptr<int64_t>();
      const auto* st = starts.data_ptr<int64_t>();
      const auto* lp = loc.data_ptr<float>();
      const auto* ap = attn.data_ptr<float>();
      auto* gv = grad_value32.data_ptr<float>();
      auto* gl = grad_loc.data_ptr<float>();
      auto* ga = grad_attn.data_ptr<float>();
      switch (V) {
        case 4:
          msda_backward_kernel<scalar_t, 4><<<blocks, kBlock, 0, stream>>>(vp, sp, st, lp, ap, gp, gv, gl, ga, d);
          break;
        case 2:
          msda_backward_kernel<scalar_t, 2><<<blocks, kBlock, 0, stream>>>(vp, sp, st, lp, ap, gp, gv, gl, ga, d);
          break;
        default:
          msda_backward_kernel<scalar_t, 1><<<blocks, kBlock, 0, stream>>>(vp, sp, st, lp, ap, gp, gv, gl, ga, d);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  auto grad_value = value.scalar_type() == at::kFloat ? grad_value32 : grad_value32.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace ebseg_msda
