"""Loading weights: official EBSeg checkpoints, open_clip CLIP weights and SAM checkpoints.

Our module names equal the official ones, so the mapping from an official EBSeg checkpoint is the
identity except for the keys listed in `IGNORED_OFFICIAL_KEYS` (constants we recompute). Everything
is loaded with `torch.load(weights_only=True)` or safetensors: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from pathlib import Path

import torch

from .config import EBSegConfig, preset_config
from .model import EBSeg

# Constant buffers of the official model that we do not keep as state.
IGNORED_OFFICIAL_KEYS = ("criterion.empty_weight",)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the keys."""


def _cache_dir() -> Path:
    return Path(os.environ.get("EBSEG_CACHE_DIR", Path.home() / ".cache" / "ebseg")) / "checkpoints"


def resolve_path(path_or_url: str) -> Path:
    """Local path for a checkpoint given as a path or a URL (http(s) or any fsspec URL), cached."""
    parsed = urllib.parse.urlparse(str(path_or_url))
    if parsed.scheme in ("", "file"):
        p = Path(parsed.path if parsed.scheme == "file" else path_or_url).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path_or_url}")
        return p
    digest = hashlib.sha1(str(path_or_url).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{digest}-{Path(parsed.path).name or 'checkpoint'}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + f".part{os.getpid()}")
    try:
        if parsed.scheme in ("http", "https"):
            torch.hub.download_url_to_file(str(path_or_url), str(tmp), progress=True)
        else:
            import fsspec

            with fsspec.open(str(path_or_url), "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path_or_url}") from None
    except Exception as e:  # network / credentials: say where it failed
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not download checkpoint {path_or_url}: {e}") from e
    os.replace(tmp, target)
    return target


def read_state_dict(path_or_url: str) -> dict[str, torch.Tensor]:
    """State dict from a .pth/.pt (detectron2 {"model": sd}, {"state_dict": sd} or a bare sd) or .safetensors."""
    path = resolve_path(path_or_url)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path_or_url} is not a loadable PyTorch checkpoint ({e})") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path_or_url} holds no state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_ebseg_state_dict(model: EBSeg, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load an official-format EBSeg state dict, with errors that name every mismatch."""
    state = {k: v for k, v in state.items() if k not in IGNORED_OFFICIAL_KEYS}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if bad_shapes or (strict and (missing or unexpected)):
        parts = []
        for title, items in (("shape mismatches", bad_shapes), ("missing keys", missing),
                             ("unexpected keys", unexpected)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"checkpoint does not fit model {model.config.name!r}: " + "; ".join(parts))
    model.load_state_dict(state, strict=strict)
    model.weights_changed()


def _qkv_names(key: str) -> str:
    """open_clip MultiheadAttention names -> our surgery-block names."""
    return (key.replace("attn.in_proj_weight", "attn.qkv.weight").replace("attn.in_proj_bias", "attn.qkv.bias")
            .replace("attn.out_proj.", "attn.proj."))


def map_open_clip_state_dict(model: EBSeg, clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (`visual.*`, text tower at top level) -> our key names."""
    cfg = model.config.clip
    out: dict[str, torch.Tensor] = {}
    for k, v in clip_state.items():
        if k.startswith("visual."):
            sub = k[len("visual."):]
            if sub.startswith("transformer.resblocks."):
                idx_str, rest = sub[len("transformer.resblocks."):].split(".", 1)
                idx = int(idx_str)
                if idx < cfg.split_layer:
                    name = f"resblocks.{idx}.{rest}"
                    out["clip_visual_extractor." + (_qkv_names(name) if idx >= cfg.surgery_start else name)] = v
                else:
                    out["clip_rec_head." + _qkv_names(f"resblocks.{idx - cfg.split_layer}.{rest}")] = v
            elif sub in ("ln_post.weight", "ln_post.bias", "proj"):
                out["clip_visual_extractor." + sub] = v
                out["clip_rec_head." + sub] = v
            else:
                out["clip_visual_extractor." + sub] = v
        elif k in ("attn_mask",):
            continue
        else:
            out["ov_classifier." + k] = v
    return out


def load_open_clip_weights(model: EBSeg, name: str | None = None, pretrained: str | None = None,
                           state: dict[str, torch.Tensor] | None = None) -> None:
    """Initialise both CLIP towers from open_clip (pretrained tag or file), e.g. ("ViT-B-16", "openai")."""
    if state is None:
        import open_clip

        name = name or model.config.clip.open_clip_name
        pretrained = pretrained or model.config.clip.open_clip_pretrained
        clip = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=True)
        state = clip.state_dict()
    mapped = map_open_clip_state_dict(model, state)
    own = model.state_dict()
    bad = [k for k in mapped if k not in own or own[k].shape != mapped[k].shape]
    if bad:
        raise CheckpointError(f"open_clip weights do not fit model {model.config.name!r}: {bad[:8]}")
    missing = sorted(k for k in own if k.startswith(("clip_", "ov_classifier.")) and k not in mapped
                     and k not in ("ov_classifier.bg_embed", "ov_classifier.attn_mask"))
    if missing:
        raise CheckpointError(f"open_clip weights lack {missing[:8]}")
    model.load_state_dict(mapped, strict=False)
    model.weights_changed()


def load_sam_weights(model: EBSeg, checkpoint: str) -> None:
    """Initialise the SAM backbone from an official SAM checkpoint (image encoder; neck ignored)."""
    state = read_state_dict(checkpoint)
    prefix = "image_encoder." if any(k.startswith("image_encoder.") for k in state) else ""
    mapped = {"backbone." + k[len(prefix):]: v for k, v in state.items()
              if k.startswith(prefix) and not k[len(prefix):].startswith("neck.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k.startswith("backbone.") and k not in mapped)
    bad = [k for k in mapped if k not in own or own[k].shape != mapped[k].shape]
    if missing or bad:
        raise CheckpointError(f"SAM checkpoint {checkpoint} does not fit: missing {missing[:8]}, mismatched {bad[:8]}")
    model.load_state_dict(mapped, strict=False)


def build_model(config: EBSegConfig | str = "ebseg-b", checkpoint: str | None = None,
                device: str | torch.device | None = None) -> EBSeg:
    """An EBSeg model from a preset name or config, with an official/our checkpoint if given."""
    cfg = preset_config(config) if isinstance(config, str) else config
    model = EBSeg(cfg)
    if checkpoint:
        load_ebseg_state_dict(model, read_state_dict(checkpoint))
        model.model_id = f"{cfg.name}:{hashlib.sha1(str(checkpoint).encode()).hexdigest()[:12]}"
    else:
        model.model_id = f"{cfg.name}:random"
    if device is not None:
        model.to(device)
    return model


def weights_digest(path_or_url: str) -> str:
    """SHA-256 of a checkpoint's bytes: the weights' identity, whatever path or URL names them.

    Computed once per file and cached (keyed by the resolved file's path, size and mtime), beside the
    download for URLs, in the cache directory for local files; a file rewritten in place gets a new
    digest. URLs are downloaded first (`resolve_path`, cached), so this reads local bytes only.
    """
    path = resolve_path(path_or_url).resolve()
    st = path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}"
    if path.is_relative_to(_cache_dir().resolve()):
        sidecar = path.with_name(path.name + ".sha256")
    else:
        sidecar = _cache_dir() / "digests" / (hashlib.sha1(str(path).encode()).hexdigest()[:24] + ".sha256")
    try:
        cached_key, digest = sidecar.read_text().split()
        if cached_key == key:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{key} {digest}\n")
        os.replace(tmp, sidecar)
    except OSError:  # a read-only cache only costs the hash again next time
        pass
    return digest
