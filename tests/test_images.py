"""Robust decoding: every mode/format case generated with Pillow, every failure a typed DecodeError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import DecodeError, decode_image, decode_image_with_info


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 40, h: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=2).astype(np.uint8)


def _check_rgb(arr: np.ndarray, w: int, h: int) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags["C_CONTIGUOUS"]


def test_rgb_png_roundtrip_exact():
    rgb = _gradient()
    out = decode_image(_save(Image.fromarray(rgb), "PNG"))
    _check_rgb(out, 40, 30)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_and_webp_decode_close_to_source():
    rgb = _gradient()
    for fmt, kw in (("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})):
        out = decode_image(_save(Image.fromarray(rgb), fmt, **kw))
        _check_rgb(out, 40, 30)
        assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 4, fmt


def test_exif_orientation_is_applied():
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(_save(im, "JPEG", quality=95, exif=exif.tobytes()))
    _check_rgb(out, 30, 40)  # width and height swapped
    # After a 90 deg clockwise rotation the left (red) half becomes the top half.
    assert out[:15, :, 0].mean() > 200 and out[25:, :, 0].mean() < 50


def test_greyscale_and_bilevel():
    grey = (np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint8)
    out = decode_image(_save(Image.fromarray(grey), "PNG"))
    _check_rgb(out, 40, 30)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    bw = Image.fromarray(grey > 127)
    assert bw.mode == "1"
    out = decode_image(_save(bw, "PNG"))
    assert set(np.unique(out)) <= {0, 255}


def test_alpha_composited_on_white():
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :6, 3] = 255  # left opaque, right transparent
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    _check_rgb(out, 12, 10)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 11]) == (255, 255, 255)
    la = Image.fromarray(np.stack([np.full((10, 12), 0, np.uint8), rgba[..., 3]], axis=2), "LA")
    out = decode_image(_save(la, "PNG"))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 11]) == (255, 255, 255)


def test_palette_with_transparency():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    p.info["transparency"] = 1  # index 1 (green) transparent -> white
    out = decode_image(_save(p, "PNG", transparency=1))
    _check_rgb(out, 8, 8)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 7]) == (0, 0, 255)
    p2 = Image.new("P", (8, 8), 0)
    p2.putpalette([10, 20, 30] + [0] * 765)
    assert tuple(decode_image(_save(p2, "GIF"))[3, 3]) == (10, 20, 30)


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # pure red in CMYK
    out, info = decode_image_with_info(_save(cmyk, "JPEG", quality=95))
    _check_rgb(out, 16, 12)
    assert info.mode == "CMYK"
    r, g, b = out[6, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16bit_greyscale_scaled_to_8bit():
    arr = np.zeros((4, 5), np.uint16)
    arr[0, 0], arr[1, 1], arr[2, 2] = 65535, 32896, 257
    out, info = decode_image_with_info(_save(Image.fromarray(arr), "PNG"))
    assert info.mode.startswith("I")
    _check_rgb(out, 5, 4)
    assert out[0, 0, 0] == 255 and out[1, 1, 0] == 128 and out[2, 2, 0] == 1 and out[3, 3, 0] == 0
    out = decode_image(_save(Image.fromarray(arr), "TIFF"))
    assert out[0, 0, 1] == 255


def test_32bit_int_and_float_images():
    arr = np.array([[0, 65535], [70000, -5]], np.int32)
    out = decode_image(_save(Image.fromarray(arr, "I"), "TIFF"))
    assert out[0, 1, 0] == 255 and out[1, 0, 0] == 255 and out[1, 1, 0] == 0
    f = np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)
    out = decode_image(_save(Image.fromarray(f, "F"), "TIFF"))
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_first_frame(fmt):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                 **({"lossless": True} if fmt == "WEBP" else {}))
    out, info = decode_image_with_info(data)
    assert info.frames == 3
    r, g, b = out[5, 5].astype(int)
    assert r > 200 and g < 40 and b < 40


def test_empty():
    with pytest.raises(DecodeError) as e:
        decode_image(b"")
    assert e.value.kind == "empty"


def test_not_image():
    for data in (b"<html><body>404 Not Found</body></html>", b"\x00" * 100, b"plain text"):
        with pytest.raises(DecodeError) as e:
            decode_image(data)
        assert e.value.kind == "not_image"


def test_unsupported_known_format():
    heic = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64
    with pytest.raises(DecodeError) as e:
        decode_image(heic)
    assert e.value.kind == "unsupported"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated(fmt):
    data = _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), fmt)
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.kind == "truncated", (fmt, e.value)


def test_too_large_checked_from_header_before_decoding():
    data = _save(Image.new("L", (300, 200)), "PNG")
    assert decode_image(data, max_pixels=60_000).shape == (200, 300, 3)
    with pytest.raises(DecodeError) as e:
        decode_image(data, max_pixels=59_999)
    assert e.value.kind == "too_large" and "max-pixels" in e.value.message


def test_bomb_beyond_pillow_limit_is_too_large():
    # A 30000 x 30000 PNG of zeros is ~1 MB compressed; decoding would need 900 MB.
    data = _save(Image.new("1", (30000, 30000)), "PNG")
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert e.value.kind == "too_large"


def test_decode_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(DecodeError("truncated", "half a file")))
    assert err.kind == "truncated" and err.message == "half a file"
