"""Image decoding that never crashes a labeling job: every input becomes RGB pixels or a typed error.

Why a module of its own: an image lake holds everything (CMYK JPEGs from print shops, 16-bit
scientific PNGs, animated GIFs, logos with alpha, truncated uploads, HTML error pages saved as
``.jpg``). One bad file must become one error row, never a dead worker.

Choices (documented in docs/labeling.md):
- EXIF orientation is applied, so label maps match what a viewer shows.
- Transparency (RGBA, LA, PA, P with a transparent index) is composited on **white**: most
  transparent images in the wild are logos/product cut-outs shown on white pages.
- 16-bit and 32-bit integer greyscale (I;16, I;16B, I) map the full 16-bit range to 8 bits
  (value / 257, clipped); float images (F) are stretched min..max.
- Animations (GIF, WebP, APNG) use their first frame.
- Truncated files are errors (Pillow's LOAD_TRUNCATED_IMAGES is not touched): a half image would
  give a half-meaningless label.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Decompression-bomb limit: width*height above this is refused as ``too_large`` (10k x 10k)."""

ERROR_KINDS = ("empty", "not_image", "truncated", "too_large", "unsupported")

# Magic numbers of image formats Pillow may lack a decoder for: such files are "unsupported"
# (a real image we cannot read), not "not_image".
_KNOWN_IMAGE_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (4, b"ftypheic"), (4, b"ftypheix"), (4, b"ftypmif1"), (4, b"ftypmsf1"), (4, b"ftypheif"),
    (4, b"ftypavif"), (4, b"ftypavis"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"), (0, b"\xff\x4f\xff\x51"),  # JPEG 2000
    (0, b"\xff\x0a"),  # JPEG XL codestream
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n"),  # JPEG XL container
)


class DecodeError(Exception):
    """A file that cannot become RGB pixels; ``kind`` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown decode error kind {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    def __reduce__(self):  # picklable across Ray workers
        return (DecodeError, (self.kind, self.message))


@dataclass(frozen=True)
class ImageInfo:
    """What decoding learnt about the source, for lineage/debugging."""

    format: str | None
    mode: str
    frames: int


def _looks_like_known_image(data: bytes) -> bool:
    return any(data[off:off + len(sig)] == sig for off, sig in _KNOWN_IMAGE_SIGNATURES)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to HxWx3 uint8 RGB (alpha composited on white)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        return _to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode in ("L", "1"):
        grey = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if arr.ndim == 3:  # Pillow may give (H, W, 1)
            arr = arr[..., 0]
        grey = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        finite = np.isfinite(arr)
        if not finite.any():
            raise DecodeError("unsupported", "float image without a finite pixel")
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
        scaled = np.where(finite, (arr - lo) / (hi - lo if hi > lo else 1.0), 0.0)
        grey = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("CMYK", "YCbCr", "HSV", "LAB", "RGBX"):
        try:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (ValueError, OSError) as exc:
            raise DecodeError("unsupported", f"cannot convert mode {mode} to RGB: {exc}") from None
    try:  # any other mode Pillow knows how to convert
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise DecodeError("unsupported", f"image mode {mode} cannot be converted to RGB: {exc}") from None


def decode_image_with_info(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Decode bytes to (HxWx3 uint8 RGB, ImageInfo); raises DecodeError, never anything else."""
    if data is None or len(data) == 0:
        raise DecodeError("empty", "file has 0 bytes")
    if max_pixels <= 0:
        raise ValueError("max_pixels must be positive")
    # Pillow refuses images above 2x its own global limit before we can judge; raise that limit
    # (never lower it) so that ours is the one that applies.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)) from None
    except UnidentifiedImageError:
        if _looks_like_known_image(data):
            raise DecodeError("unsupported", "image format not supported by this Pillow build") from None
        head = bytes(data[:16])
        raise DecodeError("not_image", f"not a recognised image format (first bytes {head!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError("truncated", f"header unreadable: {exc}") from None
    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise DecodeError("not_image", f"image has size {width}x{height}")
        if width * height > max_pixels:
            raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit "
                                           f"of {max_pixels} (--max-pixels)")
        fmt, frames = im.format, int(getattr(im, "n_frames", 1) or 1)
        if frames > 1:
            im.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a corrupt EXIF block must not lose the image
                pass
        source_mode = im.mode
        rgb = _to_rgb(im)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, EOFError, IndexError, struct.error) as exc:
        raise DecodeError("truncated", f"image data incomplete or corrupt: {exc}") from None
    except (ValueError, NotImplementedError, KeyError, TypeError) as exc:
        raise DecodeError("unsupported", f"cannot decode: {type(exc).__name__}: {exc}") from None
    except MemoryError:
        raise DecodeError("too_large", "out of memory while decoding") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError("unsupported", f"decoded to unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb), ImageInfo(format=fmt, mode=source_mode, frames=frames)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to HxWx3 uint8 RGB, or raise DecodeError(kind, message)."""
    return decode_image_with_info(data, max_pixels=max_pixels)[0]
