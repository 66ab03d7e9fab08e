"""Loading weights: official EBSeg checkpoints, open_clip CLIP weights and SAM checkpoints.

Our module names equal the official ones, so the mapping from an official EBSeg checkpoint is the
identity except for the keys listed in `IGNORED_OFFICIAL_KEYS` (constants we recompute). Everything
is loaded with `torch.load(weights_only=True)` or safetensors: a checkpoint cannot run code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import EBSegConfig, preset_config, with_inference_settings
from .errors import UserError
from .model import EBSeg
from .storage import WriteError, filesystem_for, open_url, url_for, write_bytes_atomic
from .vocabulary import Vocabulary

# Constant buffers of the official model that we do not keep as state.
IGNORED_OFFICIAL_KEYS = ("criterion.empty_weight",)


class CheckpointError(UserError):
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
            with open_url(str(path_or_url), "rb") as src, open(tmp, "wb") as dst:
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


def build_model(config: EBSegConfig | str = "ebseg-b", checkpoint: str | ResolvedCheckpoint | None = None,
                device: str | torch.device | None = None) -> EBSeg:
    """An EBSeg model from a preset name or config, with an official/our checkpoint if given.

    ``model.model_id`` names the weights by content (``ResolvedCheckpoint.model_id``), whatever path or URL
    gave them; a resolved checkpoint whose digest is known is not read again for it.
    """
    cfg = preset_config(config) if isinstance(config, str) else config
    model = EBSeg(cfg)
    if checkpoint:
        if not isinstance(checkpoint, ResolvedCheckpoint):
            checkpoint = ResolvedCheckpoint(source=checkpoint, weights_url=checkpoint, preset=cfg.name)
        load_ebseg_state_dict(model, read_state_dict(checkpoint.weights_url))
        model.model_id = checkpoint.model_id(cfg.name)
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
        write_bytes_atomic(str(sidecar), f"{key} {digest}\n".encode())
    except WriteError:  # a read-only cache only costs the hash again next time
        pass
    return digest


# --------------------------------------------------------------------------------------------------
# Our checkpoints: inference weights + metadata, and how a user names them
# --------------------------------------------------------------------------------------------------
WEIGHTS_FILE = "model.safetensors"  # inference weights of one checkpoint (the whole model, float32)
META_FILE = "meta.json"  # beside it: iteration, metrics, the same metadata as the weights' header
TRAIN_STATE_FILE = "train_state.pt"  # training state for resume (never needed for inference)
_HEADER_KEY = "ebseg"  # the safetensors metadata entry that holds our JSON
_MAX_HEADER_BYTES = 100 << 20


def save_weights(path: str | Path, model: EBSeg, metadata: dict) -> str:
    """Write the model's full state as safetensors with ``metadata`` (JSON) in its header.

    Returns the file's ``weights_digest``: the one identity of weights everywhere (label jobs, reports, model ids).
    """
    from safetensors.torch import save_file

    state, storages = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        state[k] = v.clone() if ptr in storages else v  # tied tensors (clip_*.proj): safetensors stores each once
        storages.add(ptr)
    header = {**metadata, "preset": model.config.name}
    save_file(state, str(path), metadata={_HEADER_KEY: json.dumps(header)})
    return weights_digest(str(path))


def _safetensors_header(url: str) -> dict:
    """The JSON header of a safetensors file (local or fsspec URL), read without the tensor data."""
    with open_url(url, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{url} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{url} is not a safetensors file (header of {n} bytes)")
        try:
            return json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{url} is not a safetensors file (unreadable header)") from None


def weight_shapes(url: str) -> tuple[dict[str, tuple[int, ...]], dict]:
    """(name -> shape, our metadata or {}) of a weights file, without reading the tensors where possible.

    safetensors: the header only (a ranged read on object storage). .pth/.pt: memory-mapped with
    ``weights_only=True`` (a remote file is downloaded to the cache first, where the model load finds it).
    """
    if url.endswith(".safetensors"):
        header = _safetensors_header(url)
        meta = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        try:
            ours = json.loads(meta[_HEADER_KEY]) if _HEADER_KEY in meta else {}
        except ValueError:
            ours = {}
        return shapes, ours
    path = resolve_path(url)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - pickled code, a truncated file, not a checkpoint at all
        raise CheckpointError(f"{url} is not a loadable weights file ({_first_line(e)})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{url} holds no state dict of tensors")
    return {k.removeprefix("module."): tuple(v.shape) for k, v in obj.items()}, {}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@functools.cache
def preset_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of a preset's state dict (built on the meta device: no memory, well under a second)."""
    with torch.device("meta"):
        model = EBSeg(preset_config(preset))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def weights_mismatch(shapes: dict[str, tuple[int, ...]], preset: str) -> str:
    """'' when the weights fit the preset exactly; else what does not fit, in one line."""
    want = preset_shapes(preset)
    have = {k: v for k, v in shapes.items() if k not in IGNORED_OFFICIAL_KEYS}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    bad = sorted(f"{k} {have[k]} (model {want[k]})" for k in set(want) & set(have) if have[k] != want[k])
    parts = []
    for title, items in (("shape mismatches", bad), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            parts.append(f"{len(items)} {title} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    return "; ".join(parts)


def infer_preset(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The one preset whose state dict the weights fit exactly, or None."""
    from .config import PRESETS

    fits = [p for p in PRESETS if not weights_mismatch(shapes, p)]
    return fits[0] if len(fits) == 1 else None


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """What `--checkpoint X` means: the weights file to load and what its metadata says about it."""

    source: str  # what the user gave
    weights_url: str  # the weights file (local path or URL)
    preset: str
    train_vocabulary: Vocabulary | None = None  # the classes it was trained on (decides seen/unseen)
    inference: dict = field(default_factory=dict)  # with_inference_settings kwargs it was validated with
    iteration: int | None = None

    @functools.cached_property
    def digest(self) -> str:
        """The weights' identity: sha256 of the file's bytes (``weights_digest``), computed once."""
        return weights_digest(self.weights_url)

    def model_config(self, inference_size: int | None = None, inference_max_size: int | None = None) -> EBSegConfig:
        """The preset's config with the checkpoint's inference settings; explicit sizes override them."""
        s = self.inference
        return with_inference_settings(
            preset_config(self.preset), inference_size or s.get("size"), inference_max_size or s.get("max_size"),
            alpha=s.get("alpha"), beta=s.get("beta"), gamma=s.get("gamma"))

    def vocabulary_for(self, vocab: Vocabulary) -> Vocabulary:
        """``vocab`` with seen/unseen flags against the training classes (official COCO-171 list if unknown)."""
        if self.train_vocabulary is None or vocab.seen is not None:
            return vocab
        return vocab.with_training_classes([list(s) for s in self.train_vocabulary.synonyms])

    def model_id(self, config_name: str) -> str:
        """The identity of a model built from these weights: their content (``digest``), as ``build_model`` names it."""
        return f"{config_name}:{self.digest[:12]}"

    def describe(self) -> str:
        it = f", iteration {self.iteration}" if self.iteration is not None else ""
        return f"{self.weights_url} ({self.preset}{it})"


def _is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except Exception:  # noqa: BLE001 - a bucket root or an unreachable store answers below
        return False


def _checkpoint_dirs(fs, run_path: str) -> list[str]:
    """Checkpoint directories of a run (those holding inference weights), oldest first (Ray's time-stamped names)."""
    out = []
    for entry in fs.ls(run_path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint_") and fs.exists(f"{entry.rstrip('/')}/{WEIGHTS_FILE}"):
            out.append(entry.rstrip("/"))
    return sorted(out)


def _val_score(fs, ckpt_dir: str) -> float:
    try:
        meta = json.loads(fs.cat_file(f"{ckpt_dir}/{META_FILE}"))
        return float(meta.get("metrics", {}).get("val_miou", float("-inf")))
    except Exception:  # noqa: BLE001 - no metadata: never the best
        return float("-inf")


def resolve_checkpoint(url: str, preset: str | None = None, best: bool = False) -> ResolvedCheckpoint:
    """Resolve a run directory, a checkpoint directory or a weights file (local or URL) and check it.

    A run directory means its latest checkpoint (``best``: the highest validation mIoU). ``train_state.pt``
    means the inference weights beside it. The preset comes from the weights' metadata, else from their
    shapes; a given ``preset`` must agree. Only the header (safetensors) or a memory map (.pth) is read.
    Raises CheckpointError (one line) or FileNotFoundError.
    """
    url = str(url)
    if url.startswith(("http://", "https://")):
        weights = url
    else:
        fs, path = filesystem_for(url)
        path = path.rstrip("/")
        if path.endswith("/" + TRAIN_STATE_FILE) or path == TRAIN_STATE_FILE:
            path = path[: -len(TRAIN_STATE_FILE)].rstrip("/") or "."
        if _is_dir(fs, path):
            if fs.exists(f"{path}/{WEIGHTS_FILE}"):
                path = f"{path}/{WEIGHTS_FILE}"
            else:
                dirs = _checkpoint_dirs(fs, path)
                if not dirs:
                    raise FileNotFoundError(
                        f"checkpoint not found: {url} is a directory without {WEIGHTS_FILE} and without "
                        "checkpoint_* directories holding one")
                chosen = max(dirs, key=lambda d: _val_score(fs, d)) if best else dirs[-1]
                path = f"{chosen}/{WEIGHTS_FILE}"
        elif not fs.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {url}")
        weights = url_for(url, path)
    shapes, meta = weight_shapes(weights)
    found = meta.get("preset") or infer_preset(shapes)
    if preset and found and preset != found:
        raise CheckpointError(f"--preset {preset} does not match the checkpoint, which is {found} ({weights})")
    chosen_preset = preset or found
    if not chosen_preset:
        raise CheckpointError(f"{weights} fits no preset exactly; give --preset "
                              f"(closest: {_closest_preset(shapes)})")
    problem = weights_mismatch(shapes, chosen_preset)
    if problem:
        raise CheckpointError(f"{weights} does not fit {chosen_preset}: {problem}")
    vocab = meta.get("vocabulary")
    return ResolvedCheckpoint(
        source=url, weights_url=weights, preset=chosen_preset,
        train_vocabulary=Vocabulary.from_json(vocab) if vocab else None,
        inference=dict(meta.get("inference") or {}), iteration=meta.get("iteration"))


def _closest_preset(shapes: dict[str, tuple[int, ...]]) -> str:
    from .config import PRESETS

    def score(p: str) -> int:
        want = preset_shapes(p)
        return sum(1 for k, s in shapes.items() if want.get(k) == s)

    best = max(PRESETS, key=score)
    return f"{best}: {weights_mismatch(shapes, best)}"
