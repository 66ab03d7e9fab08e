"""Reference (pure PyTorch) multi-scale deformable attention.

This path defines the semantics every other backend is checked against.  It
deliberately performs the same float operations in the same order as the
widely used ``ms_deform_attn_core_pytorch`` formulation (Deformable-DETR /
Mask2Former), so that our model reproduces the official model's numbers
bit-for-bit on CPU.  Do not "optimise" the op order here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _level_shapes(spatial_shapes: Tensor | list) -> list[tuple[int, int]]:
    """Turn spatial_shapes ([L, 2] tensor or nested list) into python (H, W) pairs."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    check_level_sizes: bool = True,
) -> tuple[int, int, int, int, int, int, int]:
    """Validate shapes once, with messages that name the offending argument.

    check_level_sizes=False skips the sum(H*W) == S check, which reads spatial_shapes and
    so would force a device sync when it lives on the GPU.
    Returns (N, S, heads, C_head, Lq, L, P).
    """
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, heads, C_head], got shape {tuple(value.shape)}")
    n, s, m, d = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be [N, Lq, heads, L, P, 2], got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    _, lq, _, lvl, p, _ = sampling_locations.shape
    if tuple(sampling_locations.shape[:3]) != (n, lq, m):
        raise ValueError(
            f"sampling_locations batch/heads {tuple(sampling_locations.shape[:3])} do not match "
            f"value (N={n}, heads={m})"
        )
    if tuple(attention_weights.shape) != (n, lq, m, lvl, p):
        raise ValueError(
            f"attention_weights must be [N, Lq, heads, L, P] = {(n, lq, m, lvl, p)}, got "
            f"{tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (lvl, 2):
        raise ValueError(f"spatial_shapes must be [L={lvl}, 2], got {tuple(spatial_shapes.shape)}")
    if tuple(level_start_index.shape) != (lvl,):
        raise ValueError(f"level_start_index must be [L={lvl}], got {tuple(level_start_index.shape)}")
    total = sum(h * w for h, w in _level_shapes(spatial_shapes)) if check_level_sizes else s
    if total != s:
        raise ValueError(f"sum of H*W over levels is {total} but value has S={s} tokens")
    return n, s, m, d, lq, lvl, p


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with ``F.grid_sample`` (exact reference path).

    value [N, S, heads, C_head]; spatial_shapes int64 [L, 2] (H, W);
    level_start_index int64 [L] (unused here: levels are contiguous, as the contract says);
    sampling_locations [N, Lq, heads, L, P, 2] with (x, y) in [0, 1];
    attention_weights [N, Lq, heads, L, P].  Returns [N, Lq, heads * C_head].
    Out-of-image samples read zeros (grid_sample zeros padding, align_corners=False).
    """
    n, _, m, d, lq, _, p = check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    shapes = _level_shapes(spatial_shapes)
    per_level_values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (h, w) in enumerate(shapes):
        # [N, HW, M, D] -> [N, HW, M*D] -> [N, M*D, HW] -> [N*M, D, H, W]
        v = per_level_values[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N, M, Lq, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        # -> [N*M, D, Lq, P]
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, -1)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()
