"""EBSeg's segmentation head: CLIP->SAM feature fusion, pixel decoder, and the Adaptively Balanced
(AdaB) decoder.

The AdaB decoder is Mask2Former's masked-attention decoder with three prediction heads per layer:
mask logits, a mask-pooled *training-class* embedding (the image embedding that is good at seen
classes), and an attention bias that steers the CLIP recognition head (whose embedding generalises to
new classes). The two embeddings are balanced at inference in `model.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import EBSegConfig
from .pixel_decoder import MSDeformAttnPixelDecoder, SinePositionEncoding


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, H, W] (eps 1e-6), as the official fusion layers."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        variance = centred.square().mean(dim=1, keepdim=True)  # biased, like layer_norm
        return centred * torch.rsqrt(variance + self.eps) * self.weight.view(-1, 1, 1) + self.bias.view(-1, 1, 1)


def masked_mean(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of `features` [B, C, H, W] over each boolean mask of `masks` [B, Q, H, W] -> [B, Q, C];
    an empty mask gives zeros.

    Always float32, autocast disabled: under float16 autocast on CPU, `sum` stays float16 (CUDA autocast
    runs it in float32), the 1e-8 guard rounds to 0 in float16 and an empty mask gives 0/0 = NaN; a
    pixel count above 65504 would also overflow float16. Float32 inputs give the same bits as before.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        weights = masks.float()
        weights = weights / (weights.sum(dim=(-1, -2), keepdim=True) + 1e-8)
        return torch.einsum("bchw,bqhw->bqc", features.float(), weights)


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def multihead_attention(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
    """nn.MultiheadAttention's computation (its weights, sequence-first [L, B, C] tensors) through
    `scaled_dot_product_attention`.

    `allowed` is a boolean [B, Lq, Lk] mask shared by all heads (True = may attend): it broadcasts over
    the heads instead of being repeated per head as nn.MultiheadAttention requires.
    """
    heads = attn.num_heads
    lq, b, c = query.shape
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

    def split(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, bias).view(x.shape[0], b, heads, c // heads).permute(1, 2, 0, 3)

    out = F.scaled_dot_product_attention(split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v),
                                         attn_mask=None if allowed is None else allowed[:, None])
    return attn.out_proj(out.permute(2, 0, 1, 3).reshape(lq, b, c))


class QuerySelfAttention(nn.Module):
    """Post-norm self-attention among the queries (positions added to queries and keys)."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        return self.norm(tgt + multihead_attention(self.self_attn, q, k, tgt))


class MaskedCrossAttention(nn.Module):
    """Post-norm cross-attention from the queries to one pixel-feature level, under a mask."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, allowed, pos, query_pos) -> torch.Tensor:
        """`allowed`: boolean [B, Q, H*W], True where a query may attend (shared by the heads)."""
        out = multihead_attention(self.multihead_attn, tgt + query_pos, memory + pos, memory, allowed)
        return self.norm(tgt + out)


class QueryFeedForward(nn.Module):
    """Post-norm ReLU feed-forward block on the queries."""

    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


@dataclass
class DecoderOutputs:
    """Per-prediction outputs (index 0 = from the learnable queries, last = final layer).

    At inference only the final prediction's `pred_masks`/`mask_embeds`/`attn_biases` are computed (the
    others are None): the official code computes all of them and keeps only the last.
    """

    pred_masks: list[torch.Tensor | None]  # [B, Q, H/4, W/4]
    mask_embeds: list[torch.Tensor | None]  # [B, Q, E], scaled by clamp(logit_scale, max=10)
    attn_biases: list[torch.Tensor | None]  # [B, clip_heads, Q, H/4, W/4]


class AdaBDecoder(nn.Module):
    """Masked-attention transformer decoder with EBSeg's embedding and attention-bias heads."""

    def __init__(self, cfg: EBSegConfig):
        super().__init__()
        d = cfg.decoder
        hidden, mask_dim = d.hidden_dim, cfg.pixel_decoder.mask_dim
        self.num_layers = d.num_layers
        self.num_clip_heads = cfg.clip.vision_heads
        self.pe_layer = SinePositionEncoding(hidden // 2)
        self.transformer_self_attention_layers = nn.ModuleList(
            QuerySelfAttention(hidden, d.num_heads) for _ in range(d.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            MaskedCrossAttention(hidden, d.num_heads) for _ in range(d.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            QueryFeedForward(hidden, d.dim_feedforward) for _ in range(d.num_layers))
        for layers in (self.transformer_self_attention_layers, self.transformer_cross_attention_layers,
                       self.transformer_ffn_layers):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(hidden)
        self.query_feat = nn.Embedding(d.num_queries, hidden)
        self.query_embed = nn.Embedding(d.num_queries, hidden)
        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden)
        self.mask_embed = MLP(hidden, hidden, mask_dim, 3)
        self.pool_proj = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden))
        self.mask_embed1 = MLP(hidden, hidden, cfg.clip.embed_dim, 3)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.attn_proj = MLP(mask_dim, mask_dim, mask_dim * self.num_clip_heads, 3)
        self.bias_scaling = nn.Linear(1, 1)

    def forward(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor,
                all_predictions: bool) -> DecoderOutputs:
        """`all_predictions`: compute embeddings and attention biases for every layer (training,
        parity checks); otherwise only for the final prediction (inference)."""
        src, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale):
            sizes.append(x.shape[-2:])
            pos.append(self.pe_layer(x).flatten(2).permute(2, 0, 1))
            src.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        bs = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        h, w = mask_features.shape[-2:]
        # Bilinear resizing is linear, so the mask logits at a feature level's size (the next layer's
        # attention mask) are the query embeddings times the mask features resized to that size: the
        # features are resized once per level instead of every layer's [Q, H, W] logits.
        with torch.no_grad():  # the attention masks are thresholds: no gradient
            level_features = [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                              for size in sizes]
        bias_features = None
        out = DecoderOutputs([], [], [])
        n_pred = self.num_layers + 1
        allowed = torch.empty(0)  # set at the end of each prediction for the next layer's cross-attention
        for i in range(n_pred):
            final = i == n_pred - 1
            if i > 0:
                level = (i - 1) % self.num_feature_levels
                output = self.transformer_cross_attention_layers[i - 1](
                    output, src[level], allowed, pos[level], query_pos)
                output = self.transformer_self_attention_layers[i - 1](output, query_pos)
                output = self.transformer_ffn_layers[i - 1](output)
            decoder_output = self.decoder_norm(output).transpose(0, 1)
            mask_embed = self.mask_embed(decoder_output)
            if all_predictions or final:
                pred_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
                out.pred_masks.append(pred_mask)
                if bias_features is None:
                    bias_features = self._bias_hidden(mask_features)
                out.attn_biases.append(self._attn_bias(mask_embed, bias_features, (h, w)))
                out.mask_embeds.append(self._class_embedding(decoder_output, pred_mask, mask_features))
            else:
                out.pred_masks.append(None)
                out.attn_biases.append(None)
                out.mask_embeds.append(None)
            if not final:
                with torch.no_grad():
                    m = torch.einsum("bqc,bchw->bqhw", mask_embed, level_features[i % self.num_feature_levels])
                    allowed = m.flatten(2).sigmoid() >= 0.5
                # Rows masking every key attend everywhere instead (official behaviour).
                allowed |= ~allowed.any(-1, keepdim=True)
        return out

    def _bias_hidden(self, mask_features: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H*W, C]: `attn_proj` up to (not including) its last linear layer."""
        x = mask_features.flatten(2).transpose(1, 2)
        for layer in self.attn_proj.layers[:-1]:
            x = F.relu(layer(x))
        return x

    def _attn_bias(self, mask_embed: torch.Tensor, hidden: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Per-head attention bias [B, heads, Q, H, W] = scaling(mask_embed . attn_proj(features)).

        The last `attn_proj` layer and `bias_scaling` are linear, so they fold into per-query weights
        (W_last^T mask_embed) and offsets: the full-resolution work is one [heads*Q, C] x [C, H*W]
        product instead of a C -> heads*C projection of every pixel followed by the dot product.
        """
        last = self.attn_proj.layers[-1]
        assert isinstance(last, nn.Linear)
        b, q, c = mask_embed.shape
        heads = self.num_clip_heads
        w_last = last.weight.reshape(heads, c, -1)  # [heads, C_out, C_in]
        scale, shift = self.bias_scaling.weight.reshape(()), self.bias_scaling.bias.reshape(())
        weight = torch.einsum("bqo,noi->bnqi", mask_embed, w_last) * scale
        offset = torch.einsum("bqo,no->bnq", mask_embed, last.bias.reshape(heads, c)) * scale + shift
        bias = torch.baddbmm(offset.reshape(b, heads * q, 1), weight.reshape(b, heads * q, -1), hidden.transpose(1, 2))
        return bias.reshape(b, heads, q, *size)

    def _class_embedding(self, decoder_output, pred_mask, mask_features) -> torch.Tensor:
        """Mask-pool the pixel features with the (hard, >0) predicted mask, add the query feature,
        project to CLIP space, L2-normalise and scale.

        The pooling runs in float32 under any autocast (`masked_mean`)."""
        pooled = masked_mean(mask_features, pred_mask.detach() > 0)
        emb = self.mask_embed1(self.pool_proj(pooled) + decoder_output)
        return torch.clamp(self.logit_scale, max=10) * F.normalize(emb, dim=-1)


class EBSegHead(nn.Module):
    """CLIP->SAM fusion, pixel decoder and AdaB decoder (`sem_seg_head` in official checkpoints)."""

    def __init__(self, cfg: EBSegConfig):
        super().__init__()
        sam_c = cfg.sam.embed_dim
        self.fusion_layers = tuple(cfg.clip.fusion_layers)
        self.clip_fusion_layers = nn.ModuleList(
            nn.Sequential(ChannelLayerNorm(cfg.clip.vision_width),
                          nn.Conv2d(cfg.clip.vision_width, sam_c, kernel_size=1))
            for _ in range(3))
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, sam_c)
        self.predictor = AdaBDecoder(cfg)

    def fuse(self, sam_features: dict[str, torch.Tensor], clip_layers: dict[int, torch.Tensor]) -> dict:
        fused = dict(sam_features)
        for i, name in enumerate(("res3", "res4", "res5")):
            f = self.clip_fusion_layers[i](clip_layers[self.fusion_layers[i]])
            fused[name] = fused[name] + F.interpolate(f, size=fused[name].shape[-2:], mode="bilinear",
                                                      align_corners=False)
        return fused

    def forward(self, sam_features, clip_layers, all_predictions: bool):
        fused = self.fuse(sam_features, clip_layers)
        mask_features, multi_scale = self.pixel_decoder(fused)
        return self.predictor(multi_scale, mask_features, all_predictions), fused, mask_features, multi_scale
