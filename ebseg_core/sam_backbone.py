"""Frozen SAM ViT image encoder turned into a res2..res5 feature pyramid.

Our own modules compute SAM's image-encoder blocks (pre-LN ViT blocks, windowed or global attention
with decomposed relative positions) under SAM's parameter names, so SAM checkpoints load key for key.
EBSeg drops SAM's neck, interpolates the positional embedding to the input's token grid, and resamples
the outputs of the four global-attention blocks to strides 4, 8, 16 and 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SAMConfig

RES_NAMES = ("res2", "res3", "res4", "res5")


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """[2L-1, D] learned embeddings of offsets -> [size, size, D], entry (i, j) for offset i - j.

    A table learned for another grid length is first resized linearly to 2*size-1 offsets.
    """
    if table.shape[0] != 2 * size - 1:
        table = F.interpolate(table.T[None], size=2 * size - 1, mode="linear")[0].T
    pos = torch.arange(size, device=table.device)
    return table[pos[:, None] - pos[None, :] + size - 1]


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a [B, H, W, C] token grid with additive relative-position terms
    q . R_h[i_h - j_h] + q . R_w[i_w - j_w] (SAM's decomposed relative positions)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        grid_q = q.reshape(b, heads, h, w, -1)
        along_h = torch.einsum("bnhwd,hkd->bnhwk", grid_q, relative_table(self.rel_pos_h, h).to(q.dtype))
        along_w = torch.einsum("bnhwd,wkd->bnhwk", grid_q, relative_table(self.rel_pos_w, w).to(q.dtype))
        bias = (along_h[..., :, None] + along_w[..., None, :]).reshape(b, heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def to_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nH * nW, size, size, C], zero-padding H and W up to multiples of `size`."""
    b, h, w, c = x.shape
    ph, pw = -h % size, -w % size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    nh, nw = (h + ph) // size, (w + pw) // size
    return x.reshape(b, nh, size, nw, size, c).transpose(2, 3).reshape(-1, size, size, c)


def from_windows(x: torch.Tensor, size: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `to_windows` (padding dropped)."""
    nh, nw = -(-h // size), -(-w // size)
    x = x.reshape(b, nh, nw, size, size, -1).transpose(2, 3).reshape(b, nh * size, nw * size, -1)
    return x[:, :h, :w]


class SAMBlock(nn.Module):
    """Pre-LN ViT block; `window` > 0 attends within non-overlapping windows (zero padded, padding
    tokens take part in attention as in SAM), 0 attends globally."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: tuple[int, int]):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads, (window, window) if window else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            b, h, w, _ = x.shape
            y = from_windows(self.attn(to_windows(y, self.window)), self.window, b, h, w)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, channels-last output [B, H/p, W/p, C]."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class SAMBackbone(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            SAMBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
                     window=0 if i in cfg.global_attn_indexes else cfg.window_size, grid=(grid, grid))
            for i in range(cfg.depth)
        )

    @property
    def out_channels(self) -> int:
        return self.cfg.embed_dim

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)  # [B, h, w, C]
        h, w = x.shape[1:3]
        pos = F.interpolate(self.pos_embed.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1)
        x = x + pos
        feats = []
        last = max(self.cfg.global_attn_indexes)
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in self.cfg.global_attn_indexes:
                feats.append(x)
        return {
            name: F.interpolate(f.permute(0, 3, 1, 2), scale_factor=s, mode="bilinear")
            for name, f, s in zip(RES_NAMES, feats, self.cfg.output_scales)
        }
