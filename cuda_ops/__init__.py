"""Multi-scale deformable attention: exact PyTorch path plus our own CUDA kernel.

``ms_deform_attn`` dispatches: CUDA tensors go to the CUDA kernel (compiled on first use
into the torch extensions cache), everything else to ``ms_deform_attn_pytorch``, the exact
reference path.  ``EBSEG_MSDA_BACKEND=pytorch|cuda|auto`` forces a path;
``EBSEG_BUILD_CUDA_OPS=1`` builds the kernel at import.  See docs/cuda_ops.md.
"""

import os as _os

from cuda_ops._pytorch import ms_deform_attn_pytorch
from cuda_ops.dispatch import DeformableAttentionKernel, kernel_available, ms_deform_attn, selected_backend

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "DeformableAttentionKernel",
    "kernel_available",
    "selected_backend",
]

if _os.environ.get("EBSEG_BUILD_CUDA_OPS", "").strip() in ("1", "true", "yes"):
    from cuda_ops import _build

    _build.build()  # fail loudly: the caller asked for the kernel explicitly
