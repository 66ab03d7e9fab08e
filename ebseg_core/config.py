"""Dataclass configs and named presets for EBSeg.

Every width, depth and layer index of the model comes from here, so the released EBSeg-B/L models
and tiny test variants (the parity fixture's dimensions) are the same code with different numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

# OpenAI CLIP normalisation (x255 because the model takes 0..255 RGB), and SAM's.
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

VILD_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


CLASS_EMBEDDINGS = ("tower", "name-hash")  # CLIPConfig.class_embeddings


@dataclass
class CLIPConfig:
    """Dimensions of the (OpenAI-style, quick-GELU) CLIP model and how EBSeg splits it."""

    embed_dim: int = 512
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    # The feature extractor keeps blocks [0, split_layer); the recognition head runs the rest.
    split_layer: int = 9
    # CLIP layers whose outputs are fused into SAM's res3, res4, res5.
    fusion_layers: tuple[int, int, int] = (3, 6, 9)
    # open_clip model name and pretrained tag used to initialise from released CLIP weights.
    open_clip_name: str = "ViT-B-16"
    open_clip_pretrained: str = "openai"
    # Where class embeddings come from: "tower" (the text tower over the prompt templates, as EBSeg) or
    # "name-hash", a stand-in where no trained tower exists: each prompt name its own fixed random unit
    # vector (seeded by the name), far apart like a trained CLIP's. The tiny preset's random tower maps
    # every name to nearly one vector (cosine 0.98+), so its classifier could not tell classes apart.
    class_embeddings: str = "tower"

    @property
    def surgery_start(self) -> int:
        """First block that runs the CLIP-surgery dual path (official: int(layers / 6))."""
        return self.vision_layers // 6

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)


@dataclass
class SAMConfig:
    """SAM ViT image encoder (segment-anything's) used as a frozen res2..res5 backbone."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    img_size: int = 1024
    patch_size: int = 16
    mlp_ratio: float = 4.0
    # Scale factors turning the stride-16 outputs of the global blocks into strides 4/8/16/32.
    output_scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    checkpoint: str | None = None  # SAM checkpoint path/URL for training from scratch


@dataclass
class PixelDecoderConfig:
    conv_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    num_points: int = 4
    encoder_layers: int = 6
    dim_feedforward: int = 1024
    num_groups: int = 32  # GroupNorm groups


@dataclass
class DecoderConfig:
    """The Adaptively Balanced decoder (masked-attention transformer decoder)."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 9  # transformer layers; predictions = num_layers + 1 (official DEC_LAYERS - 1)


@dataclass
class CriterionConfig:
    """Loss hyper-parameters; defaults are the official EBSeg-B/L recipe."""

    class_weight: float = 2.0  # matcher class cost; the loss weight is class_weight * class_loss_factor
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    class_loss_factor: float = 0.75  # the official weight dict scales both CE terms by 0.75
    ssc_weight: float = 10.0
    no_object_weight: float = 0.1
    matcher_num_points: int = 112 * 112
    num_points: int = 112 * 112
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    ssc_loss: bool = True

    def __post_init__(self) -> None:
        if self.oversample_ratio < 1:
            raise UserError(f"oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            raise UserError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")
        if self.num_points < 1 or self.matcher_num_points < 1:
            raise UserError("num_points and matcher_num_points must be positive")


@dataclass
class EBSegConfig:
    name: str = "ebseg-b"
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    size_divisibility: int = 32
    clip_resolution: float = 0.5
    # Adaptive balancing at inference: seen classes use alpha, unseen beta; gamma weighs the CLIP branch.
    alpha: float = 0.09
    beta: float = 0.3
    gamma: float = 0.7
    templates: tuple[str, ...] = VILD_TEMPLATES
    num_train_classes: int = 171
    test_min_size: int = 640
    test_max_size: int = 2560

    def validate(self) -> None:
        """The official code silently assumes these; a config that breaks them cannot load weights."""
        problems = []
        if self.pixel_decoder.mask_dim != self.decoder.hidden_dim:
            problems.append("pixel_decoder.mask_dim must equal decoder.hidden_dim")
        if self.pixel_decoder.conv_dim != self.decoder.hidden_dim:
            problems.append("pixel_decoder.conv_dim must equal decoder.hidden_dim")
        if self.clip.text_width != self.clip.embed_dim:
            problems.append("clip.text_width must equal clip.embed_dim (background embedding size)")
        if self.clip.class_embeddings not in CLASS_EMBEDDINGS:
            problems.append(f"clip.class_embeddings must be one of {', '.join(CLASS_EMBEDDINGS)}")
        if self.clip.vision_width % self.clip.vision_heads:
            problems.append("clip.vision_width must be divisible by clip.vision_heads")
        if not 0 < self.clip.split_layer <= self.clip.vision_layers:
            problems.append("clip.split_layer must be in 1..vision_layers")
        if len(self.sam.global_attn_indexes) != 4:
            problems.append("sam.global_attn_indexes must name 4 blocks (res2..res5)")
        if problems:
            raise UserError("invalid EBSeg config: " + "; ".join(problems))


def _ebseg_b() -> EBSegConfig:
    return EBSegConfig(name="ebseg-b")


def _ebseg_l() -> EBSegConfig:
    return EBSegConfig(
        name="ebseg-l",
        clip=CLIPConfig(
            embed_dim=768, vision_width=1024, vision_layers=24, vision_heads=16, patch_size=14,
            image_size=336, text_width=768, text_layers=12, text_heads=12, split_layer=18,
            fusion_layers=(6, 12, 18), open_clip_name="ViT-L-14-336", open_clip_pretrained="openai",
        ),
        clip_resolution=0.7, alpha=0.12, beta=0.4, gamma=0.6,
    )


def _ebseg_tiny() -> EBSegConfig:
    """Same structure as EBSeg-B with tiny widths: the parity fixture's dimensions."""
    return EBSegConfig(
        name="ebseg-tiny",
        clip=CLIPConfig(
            embed_dim=32, vision_width=64, vision_layers=12, vision_heads=4, patch_size=16,
            image_size=224, text_width=32, text_layers=12, text_heads=2, split_layer=9,
            fusion_layers=(3, 6, 9), open_clip_name="", open_clip_pretrained="", class_embeddings="name-hash",
        ),
        sam=SAMConfig(embed_dim=48, depth=12, num_heads=3, global_attn_indexes=(2, 5, 8, 11)),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, num_heads=8, num_points=4,
                                         encoder_layers=6, dim_feedforward=1024),
        decoder=DecoderConfig(hidden_dim=64, num_queries=20, num_heads=8, dim_feedforward=128,
                              num_layers=9),
        criterion=CriterionConfig(matcher_num_points=1024, num_points=1024),
        num_train_classes=12,
    )


PRESETS = {"ebseg-b": _ebseg_b, "ebseg-l": _ebseg_l, "ebseg-tiny": _ebseg_tiny}


def preset_config(name: str) -> EBSegConfig:
    """A fresh config for a named preset ("ebseg-b", "ebseg-l", "ebseg-tiny")."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def with_inference_settings(cfg: EBSegConfig, size: int | None = None, max_size: int | None = None,
                            alpha: float | None = None, beta: float | None = None,
                            gamma: float | None = None) -> EBSegConfig:
    """``cfg`` with inference settings changed; ``None`` keeps the preset's value.

    ``size``/``max_size``: shortest side / longest-side cap of the resize (official: 640 / 2560); a
    model trained on small crops (the tiny preset's 128 px) must be run near its training scale.
    ``alpha``/``beta``/``gamma``: the balancing weights of the CLIP branches (official per preset);
    a model whose CLIP towers are random (the tiny preset) has no knowledge there, so 0 uses the
    trained classifier alone.
    """
    changes: dict[str, float] = {}
    if size:
        changes["test_min_size"] = size
        changes["test_max_size"] = max_size or max(cfg.test_max_size, size)
    elif max_size:
        changes["test_max_size"] = max_size
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if value is not None:
            if not 0.0 <= value <= 1.0:
                raise UserError(f"inference {name} must be in [0, 1], got {value}")
            changes[name] = value
    a, b, g = changes.get("alpha", cfg.alpha), changes.get("beta", cfg.beta), changes.get("gamma", cfg.gamma)
    if a + g > 1.0 or b + g > 1.0:
        raise UserError(f"inference weights alpha={a}, beta={b}, gamma={g}: alpha+gamma and beta+gamma must be <= 1")
    return dataclasses.replace(cfg, **changes) if changes else cfg  # type: ignore[arg-type]


def config_from_fixture(cfg: dict[str, Any]) -> EBSegConfig:
    """Build a config from a parity fixture's config.json (the reference model's dimensions)."""
    c, s, p, d = cfg["clip"], cfg["sam_image_encoder"], cfg["pixel_decoder"], cfg["transformer_decoder"]
    e, k = cfg["ebseg"], cfg["criterion"]
    vis, txt = c["open_clip_model_cfg"]["vision_cfg"], c["open_clip_model_cfg"]["text_cfg"]
    width = vis["width"]
    clip = CLIPConfig(
        embed_dim=c["embed_dim"], vision_width=width, vision_layers=vis["layers"],
        vision_heads=width // vis.get("head_width", 64), patch_size=vis["patch_size"],
        image_size=vis["image_size"], text_width=txt["width"], text_layers=txt["layers"],
        text_heads=txt["heads"], context_length=txt["context_length"], vocab_size=txt["vocab_size"],
        split_layer=c["rec_head_first_layer_idx"], fusion_layers=tuple(c["fusion_layer_idx"]),
        open_clip_name="", open_clip_pretrained="",
    )
    sam = SAMConfig(
        embed_dim=s["embed_dim"], depth=s["depth"], num_heads=s["num_heads"],
        global_attn_indexes=tuple(s["global_attn_indexes"]), window_size=s["window_size"],
        img_size=s["img_size"], patch_size=s["patch_size"], mlp_ratio=float(s["mlp_ratio"]),
    )
    pix = PixelDecoderConfig(
        conv_dim=p["conv_dim"], mask_dim=p["mask_dim"], num_heads=p["n_heads"], num_points=p["n_points"],
        encoder_layers=p["transformer_enc_layers"], dim_feedforward=p["dim_feedforward"],
    )
    dec = DecoderConfig(
        hidden_dim=d["hidden_dim"], num_queries=d["num_queries"], num_heads=d["nheads"],
        dim_feedforward=d["dim_feedforward"], num_layers=d["num_transformer_layers"],
    )
    crit = CriterionConfig(
        class_weight=k["class_weight"], mask_weight=k["mask_weight"], dice_weight=k["dice_weight"],
        no_object_weight=k["no_object_weight (eos_coef)"],
        matcher_num_points=k["criterion_num_points (EBSEG.TRAIN_NUM_POINTS)"],
        num_points=k["criterion_num_points (EBSEG.TRAIN_NUM_POINTS)"],
        oversample_ratio=k["oversample_ratio"], importance_sample_ratio=k["importance_sample_ratio"],
    )
    return EBSegConfig(
        name=cfg.get("fixture", "fixture"), clip=clip, sam=sam, pixel_decoder=pix, decoder=dec,
        criterion=crit, size_divisibility=e["size_divisibility"], clip_resolution=e["clip_resolution"],
        alpha=e["inference_alpha"], beta=e["inference_beta"], gamma=e["inference_gamma"],
        templates=tuple(c["templates"]), num_train_classes=e["num_classes (criterion)"],
    )
