"""Mask2Former's multi-scale deformable-attention pixel decoder (as EBSeg configures it).

A 6-layer deformable-attention encoder over res3..res5, one FPN step to res2, and a 1x1 conv giving
the per-pixel mask features. Runs in float32 (the official code disables autocast here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ops import ms_deform_attn

from .config import PixelDecoderConfig


class SinePositionEncoding(nn.Module):
    """Fixed sine/cosine encoding of each pixel's (row, column) position, both normalised to (0, 2*pi].

    Output [B, 2 * channels_per_axis, H, W]: the row encoding's channels, then the column's; within an
    axis, channel pairs (2k, 2k+1) are (sin, cos) of position / 10000^(2k / channels_per_axis).
    """

    def __init__(self, channels_per_axis: int, temperature: float = 10000.0):
        super().__init__()
        self.channels_per_axis = channels_per_axis
        self.temperature = temperature

    def _axis(self, n: int, device) -> torch.Tensor:
        """[n, channels_per_axis] encoding of positions 1..n along one axis."""
        # Positions divided by (n + 1e-6) then scaled by 2*pi, in this order, as the released model.
        pos = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1e-6) * (2 * math.pi)
        pair = torch.arange(self.channels_per_axis, dtype=torch.float32, device=device).div(2, rounding_mode="floor")
        angles = pos[:, None] / self.temperature ** (2 * pair / self.channels_per_axis)
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        rows = self._axis(h, x.device).T[:, :, None].expand(-1, h, w)
        cols = self._axis(w, x.device).T[:, None, :].expand(-1, h, w)
        return torch.cat((rows, cols), dim=0).expand(b, -1, h, w)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), sampling through `cuda_ops`."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Start with every head sampling along its own compass direction, point k at distance k,
        with uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angle.cos(), angle.sin()], dim=-1)
        direction = direction / direction.abs().amax(dim=-1, keepdim=True)  # onto the unit square
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        offsets = direction[:, None, None, :] * distance[None, None, :, None]  # [heads, 1, points, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, value_in, spatial_shapes, level_start_index):
        n, len_q, _ = query.shape
        len_in = value_in.shape[1]
        value = self.value_proj(value_in).view(n, len_in, self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


class MSDeformAttnEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class MSDeformAttnEncoder(nn.Module):
    def __init__(self, layer_args: dict, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(MSDeformAttnEncoderLayer(**layer_args) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device) -> torch.Tensor:
        """Pixel-centre coordinates in [0, 1] of every token, repeated for every level: [B, S, L, 2]."""
        refs = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
        ref = torch.cat(refs, 0)[None, :, None, :]
        return ref.expand(batch, -1, len(spatial_shapes), 2)

    def forward(self, src, spatial_shapes_list, spatial_shapes, level_start_index, pos):
        ref = self.reference_points(spatial_shapes_list, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index)
        return src


class MSDeformAttnTransformer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, num_layers: int, d_ffn: int, n_levels: int, n_points: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model).normal_())
        self.encoder = MSDeformAttnEncoder(
            dict(d_model=d_model, d_ffn=d_ffn, n_levels=n_levels, n_heads=n_heads, n_points=n_points), num_layers)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]):
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
        level_start = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        memory = self.encoder(src_flat, shapes, spatial_shapes, level_start, pos_flat)
        return memory, shapes


class Conv2dNorm(nn.Conv2d):
    """Conv + norm (+ activation), named like detectron2's Conv2d so checkpoints map one to one."""

    def __init__(self, *args, norm: nn.Module | None = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


class MSDeformAttnPixelDecoder(nn.Module):
    """res2..res5 (all `in_channels` wide) -> mask features (stride 4) + 3 multi-scale features."""

    def __init__(self, cfg: PixelDecoderConfig, in_channels: int):
        super().__init__()
        d, g = cfg.conv_dim, cfg.num_groups
        self.transformer_in_features = ("res3", "res4", "res5")
        # Ordered res5 -> res3 (low to high resolution), as the official module list.
        convs = [nn.Conv2d(in_channels, d, kernel_size=1) for _ in range(3)]
        for conv in convs:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # a Conv2d made with bias=True has one
        self.input_proj = nn.ModuleList(nn.Sequential(conv, nn.GroupNorm(g, d)) for conv in convs)
        self.transformer = MSDeformAttnTransformer(d, cfg.num_heads, cfg.encoder_layers, cfg.dim_feedforward,
                                                   n_levels=3, n_points=cfg.num_points)
        self.pe_layer = SinePositionEncoding(d // 2)
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
        # One FPN level (stride 8 -> 4) on res2.
        self.adapter_1 = Conv2dNorm(in_channels, d, kernel_size=1, bias=False, norm=nn.GroupNorm(g, d))
        self.layer_1 = Conv2dNorm(d, d, kernel_size=3, padding=1, bias=False, norm=nn.GroupNorm(g, d),
                                  activation=F.relu)
        for m in (self.mask_features, self.adapter_1, self.layer_1):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, torch.Tensor]):
        """Returns (mask_features [B,D,H/4,W/4], multi-scale features [stride 32, 16, 8])."""
        with torch.autocast(device_type=features["res2"].device.type, enabled=False):
            srcs, pos = [], []
            for idx, name in enumerate(reversed(self.transformer_in_features)):
                x = features[name].float()
                srcs.append(self.input_proj[idx](x))
                pos.append(self.pe_layer(x))
            memory, shapes = self.transformer(srcs, pos)
            b = memory.shape[0]
            out = [z.transpose(1, 2).reshape(b, -1, h, w)
                   for z, (h, w) in zip(torch.split(memory, [h * w for h, w in shapes], dim=1), shapes)]
            lateral = self.adapter_1(features["res2"].float())
            y = lateral + F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.layer_1(y))
            return self.mask_features(out[-1]), out[:3]
