// Python bindings and argument checks for the EBSeg multi-scale deformable attention kernel.
#include <torch/extension.h>

#include <vector>

namespace ebseg_msda {
at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                             const at::Tensor& starts, const at::Tensor& loc,
                             const at::Tensor& attn);
std::vector<at::Tensor> msda_backward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                                           const at::Tensor& starts, const at::Tensor& loc,
                                           const at::Tensor& attn, const at::Tensor& grad_out);
}  // namespace ebseg_msda

namespace {

void check_common(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                  const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (cuda): value must be a CUDA tensor");
  const auto dev = value.device();
  for (const at::Tensor* t : {&shapes, &starts, &loc, &attn}) {
    TORCH_CHECK(t->device() == dev, "ms_deform_attn (cuda): all inputs must be on ", dev);
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn (cuda): inputs must be contiguous");
  }
  TORCH_CHECK(value.is_contiguous(), "ms_deform_attn (cuda): value must be contiguous");
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn (cuda): value must be [N, S, heads, C_head]");
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kHalf ||
                  value.scalar_type() == at::kBFloat16,
              "ms_deform_attn (cuda): value dtype must be float32, float16 or bfloat16");
  TORCH_CHECK(loc.scalar_type() == at::kFloat && attn.scalar_type() == at::kFloat,
              "ms_deform_attn (cuda): sampling_locations and attention_weights must be float32");
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "ms_deform_attn (cuda): spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2, "ms_deform_attn (cuda): sampling_locations must be [N, Lq, heads, L, P, 2]");
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2),
              "ms_deform_attn (cuda): sampling_locations batch/heads do not match value");
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == loc.size(0) && attn.size(1) == loc.size(1) &&
                  attn.size(2) == loc.size(2) && attn.size(3) == loc.size(3) && attn.size(4) == loc.size(4),
              "ms_deform_attn (cuda): attention_weights must be [N, Lq, heads, L, P]");
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == loc.size(3) && shapes.size(1) == 2,
              "ms_deform_attn (cuda): spatial_shapes must be [L, 2]");
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == loc.size(3),
              "ms_deform_attn (cuda): level_start_index must be [L]");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                   const at::Tensor& loc, const at::Tensor& attn) {
  check_common(value, shapes, starts, loc, attn);
  return ebseg_msda::msda_forward_cuda(value, shapes, starts, loc, attn);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& shapes,
                                 const at::Tensor& starts, const at::Tensor& loc,
                                 const at::Tensor& attn, const at::Tensor& grad_out) {
  check_common(value, shapes, starts, loc, attn);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.device() == value.device() &&
                  grad_out.scalar_type() == value.scalar_type(),
              "ms_deform_attn (cuda): grad_output must be contiguous, on the value's device and dtype");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == value.size(0) && grad_out.size(1) == loc.size(1) &&
                  grad_out.size(2) == value.size(2) * value.size(3),
              "ms_deform_attn (cuda): grad_output must be [N, Lq, heads * C_head]");
  return ebseg_msda::msda_backward_cuda(value, shapes, starts, loc, attn, grad_out);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "EBSeg multi-scale deformable attention CUDA kernels";
  m.def("forward", &forward, "ms_deform_attn forward (CUDA)");
  m.def("backward", &backward, "ms_deform_attn backward (CUDA): grad value, locations, weights");
}
