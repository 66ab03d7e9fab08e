"""The frozen CLIP towers as EBSeg splits them.

- `CLIPFeatureExtractor`: the first `split_layer` blocks of the CLIP ViT. From `surgery_start` on, blocks
  run "CLIP surgery" at inference: besides the normal path they carry a second path whose attention
  is value-value self-attention without MLP, which gives spatially cleaner dense features.
- `CLIPRecognitionHead`: the remaining blocks, run on [query SOS tokens, class token, patch tokens]
  with the decoder's attention bias (SAN-style), giving one CLIP embedding per query plus the final
  dense CLIP feature (surgery path) used for mask pooling.
- `OpenVocabClassifier`: the CLIP text tower turned into a classifier over a vocabulary, with a
  learnable background embedding.

Tensors inside the towers are sequence-first ([tokens, batch, width]) as in the official code, so the
nn.MultiheadAttention blocks compute exactly what open_clip 2.x computed for the released weights.
Module and parameter names equal the official state-dict keys.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation; the released weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in float32 and returns the input dtype (open_clip's behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def _mlp(width: int, ratio: float = 4.0) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", QuickGELU()),
                                      ("c_proj", nn.Linear(hidden, width))]))


class ResidualAttentionBlock(nn.Module):
    """Plain pre-LN CLIP transformer block (open_clip's), sequence-first."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = _mlp(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        mask = attn_mask.to(h.dtype) if attn_mask is not None else None
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class SurgeryAttention(nn.Module):
    """Multi-head attention with a second, value-value ("surgery") path sharing the same weights."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, width * 3)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, dual: bool = True):
        """x: [B, N, C]. Returns (surgery_out, plain_out) if dual else plain_out."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # Scale after the product, like the official code (not SDPA's pre-scaled q): same rounding.
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if attn_bias is not None:
            logits = logits + attn_bias
        plain = self.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))
        if not dual:
            return plain
        logits = (v @ v.transpose(-2, -1)) * self.scale
        if attn_bias is not None:
            # Official quirk: the three bias masks it builds alias one tensor, so the surgery path gets
            # the same biased mask as the plain path (only its discarded SOS rows see the bias).
            logits = logits + attn_bias
        surgery = self.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))
        return surgery, plain


class SurgeryBlock(nn.Module):
    """CLIP block with the surgery dual path. Sequence-first like the plain block."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SurgeryAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = _mlp(width)

    def forward_plain(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x).transpose(0, 1), attn_bias, dual=False).transpose(0, 1)
        return x + self.mlp(self.ln_2(x))

    def forward_dual(self, surgery: torch.Tensor | None, plain: torch.Tensor,
                     attn_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of both paths. Both attentions read ln_1(plain); the surgery path skips the MLP.

        `surgery=None` starts the dual path from `plain` (the official first surgery block).
        """
        s_res, p_res = self.attn(self.ln_1(plain).transpose(0, 1), attn_bias, dual=True)
        base = plain if surgery is None else surgery
        plain = plain + p_res.transpose(0, 1)
        plain = plain + self.mlp(self.ln_2(plain))
        return base + s_res.transpose(0, 1), plain


def resize_pos_embed(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a [1 + H*W, C] positional embedding (class token kept) to a new token grid."""
    if tuple(src) == tuple(dst):
        return pos
    cls, grid = pos[:1], pos[1:]
    grid = grid.T.reshape(1, -1, src[0], src[1])
    grid = F.interpolate(grid, size=dst, mode="bicubic", antialias=False, align_corners=False)
    return torch.cat([cls, grid.reshape(-1, dst[0] * dst[1]).T], dim=0)


class CLIPFeatureExtractor(nn.Module):
    """CLIP ViT blocks [0, split_layer): intermediate features for fusion and the recognition head."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        w = cfg.vision_width
        self.grid_size = cfg.grid_size
        self.surgery_start = cfg.surgery_start
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size[0] * cfg.grid_size[1] + 1, w))
        self.ln_pre = LayerNorm(w)
        self.resblocks = nn.ModuleList(
            SurgeryBlock(w, cfg.vision_heads) if i >= cfg.surgery_start else ResidualAttentionBlock(w, cfg.vision_heads)
            for i in range(cfg.split_layer)
        )
        # Shared with the recognition head (same Parameters, as in the official model).
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))

    def forward(self, x: torch.Tensor, inference: bool, keep: set[int] | None = None) -> dict:
        """x: normalised images [B,3,H,W]. Returns {"layers": {i: [B,C,h,w]}, "tokens": [1+hw,B,C],
        "grid": (h, w), "surgery": [1+hw,B,C] or None}; `tokens` is the last block's (plain) output.

        `keep` limits which layer feature maps are materialised (all when None).
        """
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(b, 1, c, dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_pos_embed(self.positional_embedding.to(x.dtype), self.grid_size, (h, w))
        x = self.ln_pre(x).permute(1, 0, 2)

        layers: dict[int, torch.Tensor] = {}

        def save(i: int, t: torch.Tensor) -> None:
            if keep is None or i in keep:
                layers[i] = t[1:].permute(1, 2, 0).reshape(b, c, h, w)

        save(0, x)
        surgery = None
        for i, block in enumerate(self.resblocks):
            if isinstance(block, SurgeryBlock):
                if inference:
                    surgery, x = block.forward_dual(surgery, x)
                else:
                    x = block.forward_plain(x)
            else:
                x = block(x)
            save(i + 1, x)
        return {"layers": layers, "tokens": x, "grid": (h, w), "surgery": surgery}


class CLIPRecognitionHead(nn.Module):
    """CLIP ViT blocks [split_layer, end) run on per-query SOS tokens with the decoder's attention bias."""

    def __init__(self, cfg: CLIPConfig, num_queries: int, ln_post: nn.Module, proj: nn.Parameter):
        super().__init__()
        self.num_queries = num_queries
        self.num_heads = cfg.vision_heads
        self.resblocks = nn.ModuleList(
            SurgeryBlock(cfg.vision_width, cfg.vision_heads) for _ in range(cfg.vision_layers - cfg.split_layer)
        )
        self.ln_post = ln_post
        self.proj = proj

    def build_attn_bias(self, attn_bias: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, heads, Q, H/4, W/4] decoder bias -> additive mask [B, heads, T, T] over [SOS*Q, cls, patches].

        Official semantics (additive -100, not -inf): every row sees -100 on SOS columns except a SOS on
        its own column; SOS rows see -100 on the class token and the max-pooled bias on patches.
        """
        b, heads, q = attn_bias.shape[:3]
        pooled = F.adaptive_max_pool2d(attn_bias.reshape(b, heads * q, *attn_bias.shape[-2:]), grid)
        pooled = pooled.reshape(b, heads, q, grid[0] * grid[1])
        if heads == 1:
            pooled = pooled.expand(b, self.num_heads, q, pooled.shape[-1])
        n_patch = pooled.shape[-1]
        t = q + 1 + n_patch
        base = pooled.new_zeros(t, t)
        base[:, :q] = -100
        idx = torch.arange(q, device=base.device)
        base[idx, idx] = 0
        base[:q, q] = -100
        mask = base.expand(b, self.num_heads, t, t).clone()
        mask[:, :, :q, -n_patch:] = pooled
        return mask

    def forward(self, clip_out: dict, attn_bias: torch.Tensor, inference: bool):
        """Returns (per-query embeddings [B,Q,E] L2-normalised, dense feature [B,E,h,w] or None)."""
        tokens = clip_out["tokens"]  # [1+hw, B, C]: class token + patches after the extractor
        q = self.num_queries
        h, w = clip_out["grid"]
        sos = tokens[:1].repeat(q, 1, 1)
        x = torch.cat([sos, tokens], dim=0)
        mask = self.build_attn_bias(attn_bias, (h, w)).to(x.dtype)
        blocks = cast(list[SurgeryBlock], list(self.resblocks))
        if inference:
            surg_tokens = clip_out["surgery"]
            s = torch.cat([surg_tokens[:1].repeat(q, 1, 1), surg_tokens], dim=0)
            for block in blocks:
                s, x = block.forward_dual(s, x, mask)
        else:
            for block in blocks:
                x = block.forward_plain(x, mask)
        emb = F.normalize(self.ln_post(x[:q].permute(1, 0, 2)) @ self.proj, dim=-1)
        if not inference:
            return emb, None
        dense = F.normalize(self.ln_post(s[q + 1:].permute(1, 0, 2)) @ self.proj, dim=-1)
        b = dense.shape[0]
        return emb, dense.permute(0, 2, 1).reshape(b, -1, h, w)


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class OpenVocabClassifier(nn.Module):
    """CLIP text tower as an open-vocabulary classifier with a learnable background embedding."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w).normal_(std=0.01))
        self.transformer = TextTransformer(w, cfg.text_layers, cfg.text_heads)
        self.ln_final = LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, cfg.embed_dim).normal_(std=w ** -0.5))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # The official classifier re-registers CLIP's causal mask as a persistent buffer.
        self.register_buffer("attn_mask", torch.full((cfg.context_length, cfg.context_length),
                                                     float("-inf")).triu_(1))
        self.bg_embed = nn.Parameter(torch.randn(1, cfg.embed_dim) * cfg.embed_dim ** -0.5)
        # SSC-loss target: class-affinity of the first vocabulary ever classified (official behaviour:
        # set on the very first call and never updated).
        self.text_scoremap: torch.Tensor | None = None

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, context] -> L2-normalised text embeddings [N, E] (EOT-token feature)."""
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def class_embeddings(self, tokens_per_template: torch.Tensor) -> torch.Tensor:
        """[T, C, context] tokens -> template-averaged, renormalised class embeddings [C, E]."""
        emb = torch.stack([self.encode_text(t) for t in tokens_per_template]).mean(dim=0)
        return emb / emb.norm(dim=-1, keepdim=True)

    def classifier(self, class_embeds: torch.Tensor) -> torch.Tensor:
        """Append the background embedding and L2-normalise every row: [C+1, E]."""
        weight = F.normalize(torch.cat([class_embeds.to(self.bg_embed.dtype), self.bg_embed], dim=0), dim=-1)
        if self.text_scoremap is None:
            self.text_scoremap = (weight[:-1] @ weight[:-1].T).detach()
        return weight

    def train(self, mode: bool = True):
        # Official behaviour: the text tower always stays in eval mode.
        return super().train(False)
