"""Multi-scale deformable attention: exact PyTorch path plus our own CUDA kernel.

``ms_deform_attn`` dispatches: CUDA tensors go to the CUDA kernel (built on
first use), everything else to ``ms_deform_attn_pytorch``.  Set
``EBSEG_MSDA_BACKEND=pytorch|cuda|auto`` to force a path.  See docs/cuda_ops.md.
"""

from cuda_ops._pytorch import ms_deform_attn_pytorch
from cuda_ops.dispatch import kernel_available, ms_deform_attn, selected_backend

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "kernel_available", "selected_backend"]
