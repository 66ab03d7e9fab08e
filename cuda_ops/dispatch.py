"""Backend selection for ms_deform_attn (placeholder: PyTorch path only for now)."""

from __future__ import annotations

from torch import Tensor

from cuda_ops._pytorch import ms_deform_attn_pytorch


def kernel_available() -> bool:
    """Whether the compiled CUDA kernel can be used (not yet wired)."""
    return False


def selected_backend(value: Tensor) -> str:
    """Name of the backend ms_deform_attn would use for this tensor."""
    return "pytorch"


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> Tensor:
    """Multi-scale deformable attention; see ms_deform_attn_pytorch for shapes."""
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
