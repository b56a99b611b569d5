// Fused multi-scale deformable attention (MSDA), CUDA forward + backward.
//
// Shapes (all tensors contiguous, on one CUDA device):
//   value               (N, S, M, D)           float16 / bfloat16 / float32 / float64
//   spatial_shapes      (L, 2)  int64, (H, W) per level
//   level_start_index   (L,)    int64
//   sampling_locations  (N, Lq, M, L, P, 2)    acc_t (float32, float64 for float64 value)
//   attention_weights   (N, Lq, M, L, P)       acc_t
//   output              (N, Lq, M * D)         dtype of value
// acc_t = at::opmath_type<value dtype>: float for half/bfloat16/float, double for double.
// All arithmetic and accumulation happens in acc_t. The Python wrapper
// (engine/ops/ms_deform_attn.py) casts locations / weights to acc_t and the gradients back.
//
// Bilinear sampling with zeros outside the map, grid_sample(align_corners=False) pixel
// convention: pixel x = loc_x * W - 0.5, pixel y = loc_y * H - 0.5.
//
// Forward: one thread per output element (n, q, m, d); consecutive threads take
// consecutive channels, so value loads are coalesced and location / weight loads are
// broadcasts.
// Backward: a group of G lanes (G = min(32, next_pow2(D)), inside one warp) per (n, q, m)
// item; lanes stride over channels, atomically add into an acc_t grad_value buffer (cast
// to the value dtype at the end) and reduce the location / weight gradients with warp
// shuffles. All lanes of a warp run the same loop trip counts, so the full-mask shuffles
// are always executed convergently.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

inline int64_t blocks_for(int64_t threads_needed) {
  return std::max<int64_t>(1, std::min<int64_t>((threads_needed + kThreads - 1) / kThreads,
                                                kMaxBlocks));
}

// Bilinear sample of channel d at pixel coordinates (h_im, w_im) of one level, or 0 when
// the point is outside. `base` points at value[n, level_start, m, 0]; row_stride = M * D.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bilinear(const scalar_t* __restrict__ base, int64_t H,
                                          int64_t W, int64_t row_stride, int64_t d,
                                          acc_t h_im, acc_t w_im) {
  // NaN / inf / huge values fail this test, so the conversions below are well defined.
  if (!(h_im >= acc_t(-1) && h_im < acc_t(H) && w_im >= acc_t(-1) && w_im < acc_t(W)))
    return acc_t(0);
  const acc_t hf = floor(h_im), wf = floor(w_im);
  const int64_t h_low = static_cast<int64_t>(hf), w_low = static_cast<int64_t>(wf);
  const int64_t h_high = h_low + 1, w_high = w_low + 1;
  const acc_t lh = h_im - hf, lw = w_im - wf;
  const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
  acc_t v0 = 0, v1 = 0, v2 = 0, v3 = 0;
  if (h_low >= 0 && w_low >= 0)
    v0 = static_cast<acc_t>(base[(h_low * W + w_low) * row_stride + d]);
  if (h_low >= 0 && w_high <= W - 1)
    v1 = static_cast<acc_t>(base[(h_low * W + w_high) * row_stride + d]);
  if (h_high <= H - 1 && w_low >= 0)
    v2 = static_cast<acc_t>(base[(h_high * W + w_low) * row_stride + d]);
  if (h_high <= H - 1 && w_high <= W - 1)
    v3 = static_cast<acc_t>(base[(h_high * W + w_high) * row_stride + d]);
  return hh * hw * v0 + hh * lw * v1 + lh * hw * v2 + lh * lw * v3;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    msda_forward_kernel(const scalar_t* __restrict__ value,
                        const int64_t* __restrict__ spatial_shapes,
                        const int64_t* __restrict__ level_start_index,
                        const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                        scalar_t* __restrict__ out, int64_t N, int64_t S, int64_t M,
                        int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t total = N * Lq * M * D;
  const int64_t row_stride = M * D;
  const int64_t LP = L * P;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D;
    const int64_t i = idx / D;  // (n, q, m) item
    const int64_t m = i % M;
    const int64_t n = i / (Lq * M);
    const acc_t* loc_i = loc + i * LP * 2;
    const acc_t* attn_i = attn + i * LP;
    const scalar_t* value_nm = value + n * S * row_stride + m * D;
    acc_t acc = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
      const scalar_t* base = value_nm + level_start_index[l] * row_stride;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lp = l * P + p;
        const acc_t h_im = loc_i[2 * lp + 1] * acc_t(H) - acc_t(0.5);
        const acc_t w_im = loc_i[2 * lp] * acc_t(W) - acc_t(0.5);
        acc += attn_i[lp] * bilinear<scalar_t, acc_t>(base, H, W, row_stride, d, h_im, w_im);
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int off = G >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, G);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    msda_backward_kernel(const scalar_t* __restrict__ grad_out,
                         const scalar_t* __restrict__ value,
                         const int64_t* __restrict__ spatial_shapes,
                         const int64_t* __restrict__ level_start_index,
                         const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                         acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc,
                         acc_t* __restrict__ grad_attn, int64_t N, int64_t S, int64_t M,
                         int64_t D, int64_t Lq, int64_t L, int64_t P, int G) {
  const int64_t total = N * Lq * M;
  const int64_t row_stride = M * D;
  const int64_t LP = L * P;
  const int lane = threadIdx.x & (G - 1);          // lane inside the group
  const int group_in_warp = (threadIdx.x & 31) / G;
  const int groups_per_warp = 32 / G;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  // The loop bound depends on the warp only: every lane of a warp iterates equally often.
  for (int64_t base_item = warp_id * groups_per_warp; base_item < total;
       base_item += n_warps * groups_per_warp) {
    const int64_t item = base_item + group_in_warp;
    const bool active = item < total;
    const int64_t i = active ? item : total - 1;  // in-bounds addresses for idle groups
    const int64_t m = i % M;
    const int64_t n = i / (Lq * M);
    const acc_t* loc_i = loc + i * LP * 2;
    const acc_t* attn_i = attn + i * LP;
    const scalar_t* go = grad_out + i * D;
    const scalar_t* value_nm = value + n * S * row_stride + m * D;
    acc_t* gvalue_nm = grad_value + n * S * row_stride + m * D;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
      const int64_t start = level_start_index[l];
      const scalar_t* vbase = value_nm + start * row_stride;
      acc_t* gbase = gvalue_nm + start * row_stride;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lp = l * P + p;
        const acc_t h_im = loc_i[2 * lp + 1] * acc_t(H) - acc_t(0.5);
        const acc_t w_im = loc_i[2 * lp] * acc_t(W) - acc_t(0.5);
        const acc_t aw = attn_i[lp];
        const bool inside = active && h_im >= acc_t(-1) && h_im < acc_t(H) &&
                            w_im >= acc_t(-1) && w_im < acc_t(W);
        acc_t ga = 0, gh = 0, gw = 0;
        if (inside) {
          const acc_t hf = floor(h_im), wf = floor(w_im);
          const int64_t h_low = static_cast<int64_t>(hf), w_low = static_cast<int64_t>(wf);
          const int64_t h_high = h_low + 1, w_high = w_low + 1;
          const acc_t lh = h_im - hf, lw = w_im - wf;
          const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
          const acc_t w0 = hh * hw, w1 = hh * lw, w2 = lh * hw, w3 = lh * lw;
          const bool ok0 = h_low >= 0 && w_low >= 0;
          const bool ok1 = h_low >= 0 && w_high <= W - 1;
          const bool ok2 = h_high <= H - 1 && w_low >= 0;
          const bool ok3 = h_high <= H - 1 && w_high <= W - 1;
          const int64_t o0 = (h_low * W + w_low) * row_stride;
          const int64_t o1 = (h_low * W + w_high) * row_stride;
          const int64_t o2 = (h_high * W + w_low) * row_stride;
          const int64_t o3 = (h_high * W + w_high) * row_stride;
          for (int64_t d = lane; d < D; d += G) {
            const acc_t g = static_cast<acc_t>(go[d]);
            const acc_t v0 = ok0 ? static_cast<acc_t>(vbase[o0 + d]) : acc_t(0);
            const acc_t v1 = ok1 ? static_cast<acc_t>(vbase[o1 + d]) : acc_t(0);
            const acc_t v2 = ok2 ? static_cast<acc_t>(vbase[o2 + d]) : acc_t(0);
            const acc_t v3 = ok3 ? static_cast<acc_t>(vbase[o3 + d]) : acc_t(0);
            ga += g * (w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3);
            gh += g * (hw * (v2 - v0) + lw * (v3 - v1));
            gw += g * (hh * (v1 - v0) + lh * (v3 - v2));
            const acc_t ag = aw * g;
            if (ok0) gpuAtomicAdd(gbase + o0 + d, w0 * ag);
            if (ok1) gpuAtomicAdd(gbase + o1 + d, w1 * ag);
            if (ok2) gpuAtomicAdd(gbase + o2 + d, w2 * ag);
            if (ok3) gpuAtomicAdd(gbase + o3 + d, w3 * ag);
          }
        }
        // Convergent for the whole warp (see the loop bound above).
        ga = group_sum(ga, G);
        gh = group_sum(gh, G);
        gw = group_sum(gw, G);
        if (inside && lane == 0) {
          grad_attn[i * LP + lp] = ga;
          grad_loc[(i * LP + lp) * 2] = aw * gw * acc_t(W);
          grad_loc[(i * LP + lp) * 2 + 1] = aw * gh * acc_t(H);
        }
      }
    }
  }
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& loc,
                  const at::Tensor& attn) {
  const auto dev = value.device();
  TORCH_CHECK(dev.is_cuda(), "ms_deform_attn (CUDA kernel): value must be a CUDA tensor");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &loc, &attn})
    TORCH_CHECK(t->device() == dev, "ms_deform_attn (CUDA kernel): all inputs must be on ", dev);
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D)");
  const auto vt = value.scalar_type();
  TORCH_CHECK(vt == at::kHalf || vt == at::kBFloat16 || vt == at::kFloat || vt == at::kDouble,
              "value must be float16, bfloat16, float32 or float64, got ", vt);
  const auto acc = vt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(loc.scalar_type() == acc, "sampling_locations must be ", acc, " for value ", vt);
  TORCH_CHECK(attn.scalar_type() == acc, "attention_weights must be ", acc, " for value ", vt);
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "spatial_shapes must be int64");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "level_start_index must be int64");
  TORCH_CHECK(value.is_contiguous() && spatial_shapes.is_contiguous() &&
                  level_start_index.is_contiguous() && loc.is_contiguous() &&
                  attn.is_contiguous(),
              "all inputs must be contiguous");
  const int64_t N = value.size(0), M = value.size(2);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "spatial_shapes must be (L, 2)");
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "level_start_index must be (L,)");
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == N && loc.size(2) == M && loc.size(3) == L &&
                  loc.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, P, 2)");
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == N && attn.size(1) == loc.size(1) &&
                  attn.size(2) == M && attn.size(3) == L && attn.size(4) == loc.size(4),
              "attention_weights must be (N, Lq, M, L, P)");
  // The level tables are validated (sum of H*W == S, consistent starts) on the host by the
  // Python wrapper, which reads them once; reading them here would add a device sync.
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  at::Tensor out = at::empty({N, Lq, M * D}, value.options());
  if (out.numel() == 0) return out;
  const int64_t total = N * Lq * M * D;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
      "ms_deform_attn_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        msda_forward_kernel<scalar_t, acc_t>
            <<<blocks_for(total), kThreads, 0, stream>>>(
                value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<acc_t>(),
                attention_weights.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), N, S, M, D, Lq,
                L, P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& grad_output,
                                                const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
               attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  TORCH_CHECK(grad_output.device() == value.device() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "grad_output must be on the device and of the dtype of value");
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.numel() == N * Lq * M * D,
              "grad_output must be contiguous with shape (N, Lq, M * D)");
  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // grad_value accumulates atomically in acc_t, then is cast to the value dtype.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  if (N * Lq * M * D * L * P > 0) {
    int G = 1;
    while (G < D && G < 32) G <<= 1;
    const int64_t items = N * Lq * M;
    const int64_t groups_per_block = kThreads / G;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((items + groups_per_block - 1) / groups_per_block, kMaxBlocks));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
        "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          msda_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
              grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
              spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
              sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(),
              grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
              grad_attn.data_ptr<acc_t>(), N, S, M, D, Lq, L, P, G);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  at::Tensor grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                              ? grad_value_acc
                              : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-scale deformable attention, CUDA (fp16/bf16/fp32/fp64, fp32 accumulation)";
  m.def("forward", &ms_deform_attn_forward,
        "MSDA forward: (value, spatial_shapes, level_start_index, sampling_locations, "
        "attention_weights) -> (N, Lq, M*D)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &ms_deform_attn_backward,
        "MSDA backward: (grad_output, value, spatial_shapes, level_start_index, "
        "sampling_locations, attention_weights) -> [grad_value, grad_locations, "
        "grad_weights]",
        py::call_guard<py::gil_scoped_release>());
}
