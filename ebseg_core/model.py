"""EBSeg: CLIP + SAM features, AdaB decoder, and the adaptive balancing of two image embeddings.

Submodule names equal the official state-dict prefixes (`clip_visual_extractor`, `clip_rec_head`,
`ov_classifier`, `backbone`, `sem_seg_head`), so released checkpoints load key for key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .clip import CLIPFeatureExtractor, CLIPRecognitionHead, OpenVocabClassifier
from .config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD, EBSegConfig
from .decoder import EBSegHead, masked_mean
from .errors import UserError
from .model_spec import resized_shape
from .sam_backbone import SAMBackbone
from .vocabulary import Vocabulary


@dataclass
class Segmentation:
    """Result for one image at its original size."""

    label_map: torch.Tensor  # int64 [H, W], index into the vocabulary
    confidence: torch.Tensor  # float32 [H, W]: winning class score / sum of class scores
    scores: torch.Tensor | None = None  # float32 [C, H, W] semantic scores (return_scores=True)


def text_cache_dir() -> Path:
    return Path(os.environ.get("EBSEG_CACHE_DIR", Path.home() / ".cache" / "ebseg")) / "text_embeddings"


def name_hash_embeddings(names: list[str], dim: int) -> torch.Tensor:
    """[C, dim] unit vectors, one per name, seeded by its SHA-256 (the same in every process and run).

    Names are compared as CLIP's tokenizer reads them (lower case, whitespace collapsed).
    """
    rows = []
    for name in names:
        digest = hashlib.sha256(" ".join(name.lower().split()).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        rows.append(torch.randn(dim, generator=g))
    return F.normalize(torch.stack(rows), dim=-1)


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype_for(precision: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a precision choice on a device (None = plain float32).

    `precision` is "fp32", "bf16", "fp16", or None/"auto" for the device's default: bf16 on GPUs that
    support it (fp16 on older ones), fp32 on CPU (bf16 and fp16 autocast were measured slower there; see
    docs/performance.md).
    """
    device = torch.device(device)
    if precision in (None, "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return dtypes[precision]


RESIZE_MODES = ("pil", "device")


def resize_mode_for(resize: str | None, device: torch.device | str) -> str:
    """Where `segment` resizes images: "pil" (host, PIL bilinear: exactly the official test mapper) or
    "device" (`device_resize` after copying the uint8 image); None/"auto" = "pil" on CPU, "device" on
    CUDA (label agreement of the two paths: docs/performance.md)."""
    if resize in (None, "auto"):
        return "device" if torch.device(device).type == "cuda" else "pil"
    if resize not in RESIZE_MODES:
        raise UserError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    return resize


def check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} array of shape {image.shape}")


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> size (height, width) by PIL bilinear, as the official test mapper."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def device_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] uint8 (any device) -> [3, *size] float32 0..255, resized where it lies.

    Antialiased bilinear (PIL's filter: the triangle widens with the reduction factor) rounded to
    integers like PIL's uint8 output; PIL's fixed-point arithmetic still differs by about one level on
    some pixels, hence the "pil" path where exact parity matters.
    """
    x = image.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return x.round_().clamp_(0, 255)


class EBSeg(nn.Module):
    pixel_mean: torch.Tensor  # buffers (CLIP and SAM input normalisation), registered in __init__
    pixel_std: torch.Tensor
    sam_pixel_mean: torch.Tensor
    sam_pixel_std: torch.Tensor

    def __init__(self, cfg: EBSegConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.clip_visual_extractor = CLIPFeatureExtractor(cfg.clip)
        self.clip_rec_head = CLIPRecognitionHead(cfg.clip, cfg.decoder.num_queries,
                                                 self.clip_visual_extractor.ln_post, self.clip_visual_extractor.proj)
        self.ov_classifier = OpenVocabClassifier(cfg.clip)
        self.backbone = SAMBackbone(cfg.sam)
        self.sem_seg_head = EBSegHead(cfg)
        for name, buf in (("pixel_mean", CLIP_PIXEL_MEAN), ("pixel_std", CLIP_PIXEL_STD),
                          ("sam_pixel_mean", SAM_PIXEL_MEAN), ("sam_pixel_std", SAM_PIXEL_STD)):
            self.register_buffer(name, torch.tensor(buf).view(-1, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_fingerprint: str | None = None
        self.model_id = cfg.name
        self._set_trainable()
        self.eval()

    # -- parameters ------------------------------------------------------------------------------
    def _set_trainable(self) -> None:
        """The official recipe trains the head, the background embedding and the positional
        embeddings of CLIP and SAM; both towers are otherwise frozen."""
        trainable_prefixes = ("sem_seg_head.", "ov_classifier.bg_embed", "backbone.pos_embed",
                              "clip_visual_extractor.positional_embedding")
        for name, p in self.named_parameters():
            p.requires_grad = name.startswith(trainable_prefixes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def weights_changed(self) -> None:
        """Forget cached text embeddings (call after loading weights)."""
        self._text_cache.clear()
        self._text_fingerprint = None
        self.ov_classifier.text_scoremap = None

    # -- text side ---------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        """Hash of the text tower weights and templates: part of the on-disk cache key."""
        if self._text_fingerprint is None:
            h = hashlib.sha1()
            for name, t in sorted(self.ov_classifier.state_dict().items()):
                if name == "bg_embed":
                    continue
                h.update(name.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
            h.update("\n".join(self.config.templates).encode())
            self._text_fingerprint = h.hexdigest()[:20]
        return self._text_fingerprint

    def tokenize(self, vocab: Vocabulary) -> torch.Tensor:
        """[T, C, context] token ids: each template formatted with each class's prompt name."""
        from open_clip.tokenizer import tokenize

        return torch.stack([tokenize([t.format(n) for n in vocab.names], self.config.clip.context_length)
                            for t in self.config.templates])

    def class_text_embeddings(self, vocab: Vocabulary) -> torch.Tensor:
        """[C, E] class embeddings (``config.clip.class_embeddings``); the tower's template averages are
        cached in memory and on disk."""
        key = vocab.id
        if key in self._text_cache:
            return self._text_cache[key]
        if self.config.clip.class_embeddings == "name-hash":
            hashed = name_hash_embeddings(vocab.names, self.config.clip.embed_dim).to(self.device)
            self._text_cache[key] = hashed
            return hashed
        names_hash = hashlib.sha1(repr(vocab.names).encode()).hexdigest()[:20]
        path = text_cache_dir() / f"{self._fingerprint()}-{names_hash}.pt"
        emb = None
        if path.is_file():
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                emb = None  # a damaged cache file is recomputed
        if emb is None or emb.shape[0] != len(vocab):
            emb = self.ov_classifier.class_embeddings(self.tokenize(vocab).to(self.device)).float().cpu()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(emb, tmp)
                os.replace(tmp, path)
            except OSError:
                pass  # read-only home: the in-memory cache still applies
        emb = emb.to(self.device)
        self._text_cache[key] = emb
        return emb

    def classifier_weight(self, vocab: Vocabulary) -> torch.Tensor:
        """exp(logit_scale) * normalised [class embeddings; background]: [C+1, E]."""
        weight = self.ov_classifier.classifier(self.class_text_embeddings(vocab))
        return self.ov_classifier.logit_scale.exp() * weight

    # -- shared forward pieces -------------------------------------------------------------------
    def _pad(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Stack images padded with zeros to a common size rounded up to size_divisibility."""
        d = self.config.size_divisibility
        h = max(i.shape[-2] for i in images)
        w = max(i.shape[-1] for i in images)
        h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
        out = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        for k, img in enumerate(images):
            out[k, :, : img.shape[-2], : img.shape[-1]] = img
        return out

    def _encode(self, images: list[torch.Tensor], inference: bool, all_predictions: bool,
                keep_clip_layers: set[int] | None = None):
        images = [i.to(self.device, torch.float32) for i in images]
        clip_in = self._pad([(i - self.pixel_mean) / self.pixel_std for i in images])
        sam_in = self._pad([(i - self.sam_pixel_mean) / self.sam_pixel_std for i in images])
        clip_in = F.interpolate(clip_in, scale_factor=self.config.clip_resolution, mode="bilinear")
        keep = set(self.config.clip.fusion_layers) if keep_clip_layers is None else keep_clip_layers
        clip_out = self.clip_visual_extractor(clip_in, inference=inference, keep=keep)
        sam = self.backbone(sam_in)
        dec, fused, mask_features, multi_scale = self.sem_seg_head(sam, clip_out["layers"], all_predictions)
        return dict(clip_in=clip_in, clip=clip_out, sam=sam, dec=dec, fused=fused,
                    mask_features=mask_features, multi_scale=multi_scale, padded=sam_in.shape[-2:])

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_masks(self, images: list[torch.Tensor], vocab: Vocabulary,
                      capture: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Images (float 0..255 CHW, already resized) -> (mask class log-probs [B,Q,C+1],
        final mask logits [B,Q,H/4,W/4], padded size). `capture` collects intermediates (parity)."""
        full = capture is not None
        enc = self._encode(images, inference=True, all_predictions=full,
                           keep_clip_layers=None if not full else set(range(self.config.clip.split_layer + 1)))
        dec = enc["dec"]
        weight = self.classifier_weight(vocab)
        # Official code runs the recognition head for every prediction and keeps the last; its dense
        # feature does not depend on the bias, so one call with the final bias gives the same result.
        emb_clip, dense = self.clip_rec_head(enc["clip"], dec.attn_biases[-1], inference=True)
        mask_pred = dec.pred_masks[-1]
        mask_logits = torch.einsum("bqc,nc->bqn", dec.mask_embeds[-1], weight)
        clip_logits = torch.einsum("bqc,nc->bqn", emb_clip, weight)

        pool_mask = F.interpolate(mask_pred, size=dense.shape[-2:], mode="bilinear")
        # Pooling and class ensemble in float32 under any autocast: on CPU, float16 autocast keeps
        # sum/softmax/pow/log in float16 (CUDA runs them in float32), where the 1e-8 guards round to 0:
        # an empty mask pooled 0/0 = NaN (decoder.masked_mean) and log(0) * 0 = NaN.
        with torch.autocast(device_type=self.device.type, enabled=False):
            pooled = masked_mean(dense, pool_mask.sigmoid() > 0.5)
            mask_logits, clip_logits = mask_logits.float(), clip_logits.float()
            pooled_logits = torch.einsum("bqc,nc->bqn", pooled, weight)

            p_pool = pooled_logits[..., :-1].softmax(-1)
            p_mask = mask_logits[..., :-1].softmax(-1)
            p_clip = clip_logits[..., :-1].softmax(-1)
            seen = torch.tensor(vocab.seen_flags(), dtype=torch.long, device=p_mask.device)
            a, b, g = self.config.alpha, self.config.beta, self.config.gamma
            # Seen classes lean on the training-class embedding (alpha), unseen on CLIP pooling (beta).
            log_seen = torch.log(1e-8 + (p_mask ** (1 - a - g) * p_pool ** a) * p_clip ** g) * seen
            log_new = torch.log(1e-8 + p_mask ** (1 - b - g) * p_pool ** b * p_clip ** g) * (1 - seen)
            ensembled = log_seen + log_new
            p_bg = F.softmax(mask_logits, dim=-1)[..., -1:]
            mask_cls = torch.cat([F.softmax(ensembled, dim=-1) * (1 - p_bg), p_bg], dim=-1)
            mask_cls_log = torch.log(mask_cls + 1e-8)

        if capture is not None:
            self._capture(capture, enc, weight, vocab)
            capture.update({
                "rec.clip_final_feature": dense, "final.mask_for_pooling": pool_mask,
                "final.pooled_clip_feature": pooled, "final.pooled_logits": pooled_logits,
                "final.pooled_probs": p_pool, "final.mask_probs": p_mask, "final.mask_clip_probs": p_clip,
                "final.ensembled_log_scores": ensembled, "final.mask_cls_results": mask_cls,
                "final.mask_cls_log": mask_cls_log,
            })
        return mask_cls_log, mask_pred, tuple(enc["padded"])

    def _capture(self, capture: dict, enc: dict, weight: torch.Tensor, vocab: Vocabulary) -> None:
        """Intermediates under the parity fixture's names (computes the per-layer extras)."""
        capture["preproc.clip_input"] = enc["clip_in"]
        for i, t in enc["clip"]["layers"].items():
            capture[f"clip.layer{i}"] = t
        capture["clip.last_surgery"] = enc["clip"]["surgery"]
        capture[f"clip.cls_token.{self.config.clip.split_layer}"] = enc["clip"]["tokens"][:1]
        for name, t in enc["sam"].items():
            capture[f"sam.{name}"] = t
        for name in ("res3", "res4", "res5"):
            capture[f"head.fused.{name}"] = enc["fused"][name]
        capture["pixdec.mask_features"] = enc["mask_features"]
        for i, t in enumerate(enc["multi_scale"]):
            capture[f"pixdec.multi_scale.{i}"] = t
        capture["pixdec.transformer_encoder_features"] = enc["multi_scale"][0]
        dec = enc["dec"]
        grid = enc["clip"]["grid"]
        for l in range(len(dec.pred_masks)):
            capture[f"dec.pred_masks.{l}"] = dec.pred_masks[l]
            capture[f"dec.mask_embeds.{l}"] = dec.mask_embeds[l]
            capture[f"logits.mask_logits.{l}"] = torch.einsum("bqc,nc->bqn", dec.mask_embeds[l], weight)
            capture[f"rec.attn_bias_pooled.{l}"] = F.adaptive_max_pool2d(
                dec.attn_biases[l].flatten(1, 2), grid).reshape(*dec.attn_biases[l].shape[:3], *grid)
            emb, _ = self.clip_rec_head(enc["clip"], dec.attn_biases[l], inference=True)
            capture[f"rec.mask_embeds_clip.{l}"] = emb
            capture[f"logits.mask_logits_clip.{l}"] = torch.einsum("bqc,nc->bqn", emb, weight)
        capture[f"dec.attn_biases.{len(dec.pred_masks) - 1}"] = dec.attn_biases[-1]
        capture["ov.text_embed_normed"] = self.ov_classifier.classifier(self.class_text_embeddings(vocab))
        capture["ov.logit_scale_exp"] = self.ov_classifier.logit_scale.exp().reshape(1)
        capture["ov.classifier_weight"] = weight

    @staticmethod
    def semantic_scores(mask_cls_log: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        """[Q, C+1] log-probs and [Q, H, W] mask logits -> [C, H, W] per-class scores."""
        return torch.einsum("qc,qhw->chw", F.softmax(mask_cls_log, dim=-1)[..., :-1], mask_pred.sigmoid())

    @torch.no_grad()
    def forward_eval(self, images: list[torch.Tensor], vocab: Vocabulary,
                     output_sizes: list[tuple[int, int] | None] | None = None,
                     capture: dict | None = None, precision: str = "fp32") -> list[torch.Tensor]:
        """The official evaluation forward: per-image [C, H_out, W_out] float32 semantic scores.

        images: float/uint8 CHW tensors (already resized by the caller); output_sizes: per image the
        (height, width) to resize to, None = the image's own size; precision: see `autocast_dtype_for`.
        """
        dtype = autocast_dtype_for(precision, self.device)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            mask_cls_log, mask_pred, padded = self.predict_masks(images, vocab, capture)
        mask_cls_log, mask_pred = mask_cls_log.float(), mask_pred.float()
        mask_pred = F.interpolate(mask_pred, size=padded, mode="bilinear", align_corners=False)
        results = []
        for k, img in enumerate(images):
            h, w = img.shape[-2:]
            out = (output_sizes[k] if output_sizes else None) or (h, w)
            m = F.interpolate(mask_pred[k: k + 1, :, :h, :w], size=out, mode="bilinear", align_corners=False)[0]
            results.append(self.semantic_scores(mask_cls_log[k], m))
        return results

    def prepare_image(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> CHW float tensor resized as the official test mapper (PIL bilinear)."""
        check_rgb(image)
        h, w = image.shape[:2]
        size = resized_shape(h, w, self.config.test_min_size, self.config.test_max_size)
        return torch.from_numpy(pil_resize(image, size)).permute(2, 0, 1).float()

    def _model_input(self, image: np.ndarray, size: tuple[int, int], resize: str) -> torch.Tensor:
        """One image as a CHW tensor on the model's device, resized to `size` ("pil": on the host, exactly
        as the official test mapper; "device": `device_resize` after the copy). Only uint8 crosses to the
        device (pinned and asynchronous on CUDA); normalisation happens there in `_encode`."""
        if resize == "pil":
            image = pil_resize(image, size)
        image = np.ascontiguousarray(image)
        host = torch.from_numpy(image if image.flags.writeable else image.copy())  # torch wants writable
        if self.device.type == "cuda":
            host = host.pin_memory()
        x = host.to(self.device, non_blocking=True).permute(2, 0, 1)
        return device_resize(x, size) if resize == "device" else x

    @torch.no_grad()
    def segment(self, images: list[np.ndarray], vocab: Vocabulary, batch_size: int = 4,
                return_scores: bool = False, output_sizes: list[tuple[int, int]] | None = None,
                precision: str | None = None, resize: str | None = None) -> list[Segmentation]:
        """Segment RGB images with a vocabulary; results at each image's original size.

        Images are batched only with images of the same padded size, so every result equals the
        one-image-at-a-time result of the official evaluation. `precision` ("fp32", "bf16", "fp16",
        None = "auto"; see `autocast_dtype_for`) runs the model under autocast; the pixel decoder, the
        mask poolings, the class ensemble and the final scores stay in float32. `resize` ("pil",
        "device", None = "auto"; see `resize_mode_for`) chooses where the test resize runs.
        `output_sizes` (used by test-time augmentation): the images are already resized model inputs
        (no test resize here) and result k is produced at output_sizes[k] (the official postprocess).
        """
        autocast_dtype = autocast_dtype_for(precision, self.device)
        resize = resize_mode_for(resize, self.device)
        for img in images:
            check_rgb(img)
        if output_sizes is None:
            sizes = [resized_shape(img.shape[0], img.shape[1], self.config.test_min_size, self.config.test_max_size)
                     for img in images]
        else:
            sizes = [tuple(img.shape[:2]) for img in images]
        d = self.config.size_divisibility
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (h, w) in enumerate(sizes):
            groups.setdefault((-(-h // d), -(-w // d)), []).append(k)
        results: list[Segmentation | None] = [None] * len(images)
        use_amp = autocast_dtype is not None
        for idxs in groups.values():
            for start in range(0, len(idxs), max(1, batch_size)):
                chunk = idxs[start: start + batch_size]
                inputs = [self._model_input(images[k], sizes[k], resize) for k in chunk]
                with torch.autocast(self.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=use_amp):
                    mask_cls_log, mask_pred, padded = self.predict_masks(inputs, vocab)
                mask_cls_log, mask_pred = mask_cls_log.float(), mask_pred.float()
                mask_pred = F.interpolate(mask_pred, size=padded, mode="bilinear", align_corners=False)
                for j, k in enumerate(chunk):
                    h, w = sizes[k]
                    out = tuple(images[k].shape[:2]) if output_sizes is None else tuple(output_sizes[k])
                    m = mask_pred[j, :, :h, :w]
                    if out != (h, w):  # a same-size bilinear resize is the identity: skip it
                        m = F.interpolate(m[None], size=out, mode="bilinear", align_corners=False)[0]
                    results[k] = self._labels(mask_cls_log[j], m, return_scores)
        return results  # type: ignore[return-value]

    def _labels(self, mask_cls_log: torch.Tensor, mask_pred: torch.Tensor, return_scores: bool) -> Segmentation:
        """Label map and confidence, computed in row chunks so large vocabularies fit in memory."""
        cls = F.softmax(mask_cls_log, dim=-1)[..., :-1]
        _, h, w = mask_pred.shape
        label = torch.empty(h, w, dtype=torch.long, device=mask_pred.device)
        conf = torch.empty(h, w, dtype=torch.float32, device=mask_pred.device)
        scores = torch.empty(cls.shape[1], h, w, device=mask_pred.device) if return_scores else None
        rows = max(1, (1 << 24) // max(1, cls.shape[1] * w))
        for r in range(0, h, rows):
            s = torch.einsum("qc,qhw->chw", cls, mask_pred[:, r: r + rows].sigmoid())
            best, idx = s.max(dim=0)
            label[r: r + rows] = idx
            conf[r: r + rows] = best / s.sum(dim=0).clamp_min(1e-12)
            if scores is not None:
                scores[:, r: r + rows] = s
        return Segmentation(label.cpu(), conf.cpu(), scores.cpu() if scores is not None else None)

    # -- training --------------------------------------------------------------------------------
    def training_outputs(self, images: torch.Tensor, vocab: Vocabulary) -> dict:
        """Padded uint8/float images [B,3,H,W] (0..255) -> the criterion's inputs (official layout)."""
        enc = self._encode(list(images), inference=False, all_predictions=True)
        dec = enc["dec"]
        weight = self.classifier_weight(vocab)
        preds = []
        for l in range(len(dec.pred_masks)):
            emb_clip, _ = self.clip_rec_head(enc["clip"], dec.attn_biases[l], inference=False)
            preds.append({
                "pred_logits": torch.einsum("bqc,nc->bqn", dec.mask_embeds[l], weight),
                "pred_masks": dec.pred_masks[l],
                "pred_logits_1": torch.einsum("bqc,nc->bqn", emb_clip, weight),
            })
        out = dict(preds[-1])
        out["aux_outputs"] = preds[:-1]
        out["mask_embeds"] = dec.mask_embeds[-1]
        out["text_scoremap"] = self.ov_classifier.text_scoremap
        return out
