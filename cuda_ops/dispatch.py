"""Backend selection for ms_deform_attn: our CUDA kernel on CUDA tensors, PyTorch elsewhere.

``EBSEG_MSDA_BACKEND`` (read on every call, so tests and benchmarks can flip it):
  * ``auto`` (default): CUDA kernel for float32/float16/bfloat16 CUDA tensors when it builds,
    otherwise the exact PyTorch path (one warning if the build failed);
  * ``pytorch``: always the PyTorch path;
  * ``cuda``: always the kernel; raises if the tensors are not on a GPU or it cannot be built.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cuda_ops import _build
from cuda_ops._pytorch import check_inputs, ms_deform_attn_pytorch

_LOG = logging.getLogger("cuda_ops")
BACKEND_ENV = "EBSEG_MSDA_BACKEND"
_BACKENDS = ("auto", "pytorch", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned = False


def requested_backend() -> str:
    """The backend asked for through EBSEG_MSDA_BACKEND (auto when unset)."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}; expected one of {', '.join(_BACKENDS)}")
    return name


def kernel_available() -> bool:
    """True when the CUDA extension is (or can now be) built and loaded; never raises."""
    global _warned
    try:
        _build.build()
        return True
    except _build.BuildError as exc:
        if not _warned:
            _warned = True
            _LOG.warning("cuda_ops: CUDA kernel unavailable, using the PyTorch path (%s)", exc)
        return False


def selected_backend(value: Tensor) -> str:
    """'cuda' or 'pytorch': what ms_deform_attn would run for this value tensor."""
    req = requested_backend()
    if req == "pytorch":
        return "pytorch"
    if req == "cuda":
        if not value.is_cuda:
            raise RuntimeError(f"{BACKEND_ENV}=cuda but value is on {value.device}, not a CUDA device")
        if value.dtype not in KERNEL_DTYPES:
            raise RuntimeError(f"{BACKEND_ENV}=cuda but the kernel does not support {value.dtype}")
        try:
            _build.build()
        except _build.BuildError as exc:
            raise RuntimeError(f"{BACKEND_ENV}=cuda but the CUDA kernel cannot be built: {exc}") from exc
        return "cuda"
    if value.is_cuda and value.dtype in KERNEL_DTYPES and kernel_available():
        return "cuda"
    return "pytorch"


class DeformableAttentionKernel(torch.autograd.Function):
    """Autograd wrapper around the CUDA kernel (forward + analytic backward).

    Locations and weights are handed to the kernel in float32 whatever their dtype: a
    half-precision location is off by up to ~0.1 pixel on an 80-pixel-wide level.  Their
    gradients are cast back to the caller's dtypes.
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ext = _build.build()
        dev = value.device
        value_c = value.contiguous()
        shapes = spatial_shapes.to(device=dev, dtype=torch.int64).contiguous()
        starts = level_start_index.to(device=dev, dtype=torch.int64).contiguous()
        loc = sampling_locations.to(dtype=torch.float32).contiguous()
        attn = attention_weights.to(dtype=torch.float32).contiguous()
        out = ext.forward(value_c, shapes, starts, loc, attn)
        ctx.save_for_backward(value_c, shapes, starts, loc, attn)
        ctx.grad_dtypes = (sampling_locations.dtype, attention_weights.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        ext = _build.build()
        grad_value, grad_loc, grad_attn = ext.backward(
            value, shapes, starts, loc, attn, grad_output.to(value.dtype).contiguous()
        )
        loc_dtype, attn_dtype = ctx.grad_dtypes
        return grad_value, None, None, grad_loc.to(loc_dtype), grad_attn.to(attn_dtype)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention, dispatched to the best available backend.

    value [N, S, heads, C_head]; spatial_shapes int64 [L, 2] (H, W); level_start_index int64
    [L]; sampling_locations [N, Lq, heads, L, P, 2] (x, y) in [0, 1]; attention_weights
    [N, Lq, heads, L, P].  Returns [N, Lq, heads * C_head] in value's dtype.  Semantics are
    those of ms_deform_attn_pytorch (grid_sample bilinear, zeros padding, align_corners=False).
    """
    if selected_backend(value) == "cuda":
        # Reading GPU-resident spatial_shapes would cost a device sync on every call.
        check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                     check_level_sizes=not spatial_shapes.is_cuda)
        return DeformableAttentionKernel.apply(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
