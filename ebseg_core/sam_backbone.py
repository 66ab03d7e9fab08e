"""Frozen SAM ViT image encoder turned into a res2..res5 feature pyramid.

segment-anything's own `Block` and `PatchEmbed` do the work (same numerics and parameter names as
SAM checkpoints); EBSeg drops SAM's neck, interpolates the positional embedding to the input's token
grid, and resamples the outputs of the four global-attention blocks to strides 4, 8, 16 and 32.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block, PatchEmbed
from torch import nn

from .config import SAMConfig

RES_NAMES = ("res2", "res3", "res4", "res5")


class SAMBackbone(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(kernel_size=(cfg.patch_size, cfg.patch_size),
                                      stride=(cfg.patch_size, cfg.patch_size), embed_dim=cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            Block(dim=cfg.embed_dim, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_rel_pos=True,
                  rel_pos_zero_init=True,
                  window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                  input_size=(grid, grid) if i in cfg.global_attn_indexes else (cfg.window_size, cfg.window_size))
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
