"""Reference (pure PyTorch) multi-scale deformable attention.

This path defines the semantics every other backend is checked against (and is
what CPU inference runs): bilinear sampling by ``F.grid_sample`` per level, a
weighted sum over the points.
"""

from __future__ import annotations

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
    """Multi-scale deformable attention with ``F.grid_sample`` (the reference path).

    value [N, S, heads, C_head]; spatial_shapes int64 [L, 2] (H, W);
    level_start_index int64 [L] (unused here: levels are contiguous, as the contract says);
    sampling_locations [N, Lq, heads, L, P, 2] with (x, y) in [0, 1];
    attention_weights [N, Lq, heads, L, P].  Returns [N, Lq, heads * C_head].
    Out-of-image samples read zeros (grid_sample zeros padding, align_corners=False).

    Each level is one batch of (sample, head) images sampled bilinearly at its points; the
    weighted samples are summed level by level.
    """
    n, _, heads, ch, lq, _, _ = check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    shapes = _level_shapes(spatial_shapes)
    # One image per (sample, head): [N*heads, L, P, Lq, 2] grids in grid_sample's [-1, 1] range. Points
    # come before queries so that the weighted sum reduces over an outer axis (a reduction over an
    # innermost axis of 4 is slow on CPU): 0.71x the time at EBSeg-B shapes, identical results.
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5).flatten(0, 1)
    weights = attention_weights.permute(0, 2, 3, 4, 1).flatten(0, 1)  # [N*heads, L, P, Lq]
    out: Tensor | None = None
    for level, (level_value, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        images = level_value.permute(0, 2, 3, 1).reshape(n * heads, ch, h, w)
        samples = F.grid_sample(images, grids[:, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [N*heads, C_head, P, Lq]
        term = (samples * weights[:, None, level]).sum(2)
        out = term if out is None else out + term
    assert out is not None  # check_inputs requires at least one level
    return out.view(n, heads * ch, lq).transpose(1, 2).contiguous()
