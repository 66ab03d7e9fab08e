"""Tests for cuda_ops: the exact PyTorch path, backend dispatch, and the CUDA kernel.

CPU-only machines run the reference-path tests, the dispatch tests and (when nvcc is
present) the compile-only test; kernel-vs-fallback tests need a CUDA device and are
skipped with that reason otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cuda_ops
from cuda_ops import _build as msda_build
from cuda_ops import dispatch, ms_deform_attn, ms_deform_attn_pytorch

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: kernel-vs-fallback comparison needs a GPU")


def make_inputs(n, shapes, heads, ch, lq, points, *, dtype=torch.float32, device="cpu", oob=0.0, seed=0):
    """Random MSDA inputs; oob > 0 widens locations to [-oob, 1+oob] so some fall outside."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    lvl = len(shapes)
    value = torch.randn(n, s, heads, ch, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, heads, lvl, points, 2, generator=g, dtype=torch.float64) * (1 + 2 * oob) - oob
    attn = torch.rand(n, lq, heads, lvl, points, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    cast = dict(dtype=dtype, device=device)
    return value.to(**cast), ss.to(device), lsi.to(device), loc.to(**cast), attn.to(**cast)


def naive_msda(value, shapes, starts, loc, attn):
    """Independent loop implementation: explicit bilinear sampling, zeros outside the image."""
    value, loc, attn = (t.detach().double().cpu().numpy() for t in (value, loc, attn))
    shapes = shapes.cpu().tolist()
    starts = starts.cpu().tolist()
    n, _, heads, ch = value.shape
    lq, pts = loc.shape[1], loc.shape[4]
    out = np.zeros((n, lq, heads, ch))
    for b in range(n):
        for q in range(lq):
            for m in range(heads):
                for li, (h, w) in enumerate(shapes):
                    for p in range(pts):
                        x = loc[b, q, m, li, p, 0] * w - 0.5
                        y = loc[b, q, m, li, p, 1] * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = np.zeros(ch)
                        for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= xx < w and 0 <= yy < h:
                                    acc += wx * wy * value[b, starts[li] + yy * w + xx, m]
                        out[b, q, m] += attn[b, q, m, li, p] * acc
    return torch.from_numpy(out.reshape(n, lq, heads * ch))


# ----------------------------------------------------------------------------- reference path


@pytest.mark.parametrize("oob", [0.0, 0.3])
def test_pytorch_path_matches_naive_loops(oob):
    inputs = make_inputs(2, [(5, 7), (3, 4), (2, 2)], heads=2, ch=3, lq=6, points=3, dtype=torch.float64, oob=oob)
    got = ms_deform_attn_pytorch(*inputs)
    want = naive_msda(*inputs)
    assert got.shape == (2, 6, 6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if oob:  # samples fully outside must contribute exactly nothing
        value, ss, lsi, loc, attn = inputs
        far = loc.clone()
        far[0, 0] = -5.0
        assert torch.count_nonzero(ms_deform_attn_pytorch(value, ss, lsi, far, attn)[0, 0]) == 0


def test_pytorch_path_float32_matches_naive_loops():
    inputs = make_inputs(1, [(6, 6), (3, 3)], heads=2, ch=4, lq=5, points=2, oob=0.2, seed=3)
    got = ms_deform_attn_pytorch(*inputs)
    torch.testing.assert_close(got.double(), naive_msda(*inputs), rtol=1e-5, atol=1e-6)


def test_pytorch_path_gradcheck_float64():
    value, ss, lsi, loc, attn = make_inputs(1, [(4, 5), (2, 3)], heads=2, ch=2, lq=3, points=2,
                                            dtype=torch.float64, oob=0.1, seed=1)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    fn = lambda v, l, a: ms_deform_attn_pytorch(v, ss, lsi, l, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-5)


def test_dispatch_on_cpu_is_the_exact_pytorch_path(monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    inputs = make_inputs(2, [(8, 8), (4, 4), (2, 2)], heads=8, ch=4, lq=10, points=4, oob=0.1)
    assert cuda_ops.selected_backend(inputs[0]) == "pytorch"
    assert torch.equal(ms_deform_attn(*inputs), ms_deform_attn_pytorch(*inputs))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda v, s, i, l, a: (v[0], s, i, l, a), "value must be"),
        (lambda v, s, i, l, a: (v, s, i, l[..., :1], a), "sampling_locations must be"),
        (lambda v, s, i, l, a: (v, s, i, l, a[..., :1]), "attention_weights must be"),
        (lambda v, s, i, l, a: (v, s[:1], i, l, a), "spatial_shapes must be"),
        (lambda v, s, i, l, a: (v[:, :-1], s, i, l, a), "sum of H\\*W"),
    ],
)
def test_bad_shapes_raise_clear_errors(bad, match):
    inputs = make_inputs(1, [(4, 4), (2, 2)], heads=2, ch=2, lq=3, points=2)
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(*bad(*inputs))


# ----------------------------------------------------------------------------- dispatch


def test_backend_env_values(monkeypatch):
    value = torch.zeros(1, 4, 1, 2)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "pytorch")
    assert cuda_ops.selected_backend(value) == "pytorch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "AUTO")
    assert cuda_ops.selected_backend(value) == "pytorch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        cuda_ops.selected_backend(value)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="EBSEG_MSDA_BACKEND"):
        cuda_ops.selected_backend(value)


def test_build_failure_warns_once_and_falls_back(monkeypatch, caplog):
    def broken(verbose=False):
        raise msda_build.BuildError("nvcc exploded")

    monkeypatch.setattr(msda_build, "build", broken)
    monkeypatch.setattr(dispatch, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="cuda_ops"):
        assert cuda_ops.kernel_available() is False
        assert cuda_ops.kernel_available() is False
    warnings = [r for r in caplog.records if "nvcc exploded" in r.getMessage()]
    assert len(warnings) == 1


def test_extension_name_is_keyed_by_sources_and_arch():
    a = msda_build.extension_name(["9.0"])
    assert a == msda_build.extension_name(["9.0"])
    assert a != msda_build.extension_name(["8.0"])
    assert a.startswith("ebseg_msda_") and a.endswith("_sm90")
    assert msda_build._gencode_flags(["9.0+PTX"]) == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def test_build_reports_missing_toolkit(monkeypatch):
    monkeypatch.setattr(msda_build, "_module", None)
    monkeypatch.setattr(msda_build, "_error", None)
    monkeypatch.setattr(msda_build, "cuda_home", lambda: None)
    with pytest.raises(msda_build.BuildError, match="no CUDA toolkit"):
        msda_build.build()
    assert "no CUDA toolkit" in msda_build.last_error()


class _FakeExtension:
    """Stands in for the compiled module to test the autograd glue on CPU.

    It asserts the argument contract the C++ side checks (float32 locations/weights, int64
    shapes, contiguous) and computes with the reference path.
    """

    def __init__(self):
        self.calls = []

    def _check(self, value, shapes, starts, loc, attn):
        assert shapes.dtype == starts.dtype == torch.int64
        assert loc.dtype == attn.dtype == torch.float32
        assert all(t.is_contiguous() for t in (value, shapes, starts, loc, attn))

    def forward(self, value, shapes, starts, loc, attn):
        self._check(value, shapes, starts, loc, attn)
        self.calls.append("forward")
        return ms_deform_attn_pytorch(value.float(), shapes, starts, loc, attn).to(value.dtype)

    def backward(self, value, shapes, starts, loc, attn, grad_out):
        self._check(value, shapes, starts, loc, attn)
        assert grad_out.dtype == value.dtype and grad_out.is_contiguous()
        self.calls.append("backward")
        with torch.enable_grad():  # backward runs under no_grad (once_differentiable)
            ins = [t.detach().float().requires_grad_(True) for t in (value, loc, attn)]
            ms_deform_attn_pytorch(ins[0], shapes, starts, ins[1], ins[2]).backward(grad_out.float())
        return ins[0].grad.to(value.dtype), ins[1].grad, ins[2].grad


def test_autograd_function_glue_with_fake_extension(monkeypatch):
    fake = _FakeExtension()
    monkeypatch.setattr(msda_build, "build", lambda verbose=False: fake)
    value, ss, lsi, loc, attn = make_inputs(1, [(6, 5), (3, 3)], heads=2, ch=4, lq=7, points=2, oob=0.1)
    value = value.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    loc = loc.double().requires_grad_(True)
    attn = attn.to(torch.bfloat16).requires_grad_(True)
    value.requires_grad_(True)
    out = cuda_ops.DeformableAttentionKernel.apply(value, ss.int(), lsi.int(), loc, attn)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 7, 8)
    out.float().sum().backward()
    assert fake.calls == ["forward", "backward"]
    assert value.grad.dtype == torch.bfloat16 and value.grad.shape == value.shape
    assert loc.grad.dtype == torch.float64 and attn.grad.dtype == torch.bfloat16
    assert loc.grad.abs().sum() > 0 and attn.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- compile only


@pytest.mark.skipif(msda_build.cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_kernel_compiles():
    """Compiles for sm_90 only, into the default torch extensions cache (fast when cached)."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    proc = subprocess.run(
        [sys.executable, "-m", "cuda_ops.build", "--check"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cuda_ops build OK" in proc.stdout


# ----------------------------------------------------------------------------- kernel vs fallback

EBSEG_B = dict(shapes=[(20, 20), (10, 10), (5, 5)], heads=8, ch=32, points=4)  # reduced spatial size
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _kernel_vs_reference(monkeypatch, dtype, shapes, heads, ch, points, n=2, lq=None, oob=0.1, seed=0):
    s = sum(h * w for h, w in shapes)
    lq = lq or s
    value, ss, lsi, loc, attn = make_inputs(n, shapes, heads, ch, lq, points, dtype=dtype, device="cuda",
                                            oob=oob, seed=seed)
    # Reference: the PyTorch path in float64 on exactly the same (already rounded) inputs.
    ref_in = [t.detach().double().requires_grad_(True) for t in (value, loc, attn)]
    ref = ms_deform_attn_pytorch(ref_in[0], ss, lsi, ref_in[1], ref_in[2])
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)

    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    ins = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn(ins[0], ss, lsi, ins[1], ins[2])
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(grad_out.to(dtype))

    rtol, atol = TOL[dtype]
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * scale(ref))
    for name, got, want in zip(("value", "locations", "weights"), ins, ref_in):
        assert got.grad.dtype == got.dtype, name
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=rtol * 4, atol=atol * 4 * scale(want.grad),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_fallback_ebseg_b_shapes(monkeypatch, dtype):
    _kernel_vs_reference(monkeypatch, dtype, **EBSEG_B)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ch", [8, 6, 3, 64, 256])  # tiny (8), V=2, V=1, one full warp, chunk loop
def test_kernel_matches_fallback_channel_widths(monkeypatch, dtype, ch):
    _kernel_vs_reference(monkeypatch, dtype, [(7, 9), (4, 5)], heads=3, ch=ch, points=2, lq=37, oob=0.3, seed=ch)


@needs_cuda
def test_kernel_single_level_many_points_and_float64_falls_back(monkeypatch):
    _kernel_vs_reference(monkeypatch, torch.float32, [(16, 12)], heads=1, ch=32, points=9, lq=50, oob=0.5)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "auto")
    value = torch.zeros(1, 4, 1, 2, dtype=torch.float64, device="cuda")
    assert cuda_ops.selected_backend(value) == "pytorch"


@needs_cuda
def test_kernel_mixed_dtypes_and_noncontiguous(monkeypatch):
    """Half value with float32 locations/weights (autocast style) and a non-contiguous value."""
    value, ss, lsi, loc, attn = make_inputs(2, [(10, 10), (5, 5)], 4, 16, 30, 4, device="cuda", oob=0.1)
    want = ms_deform_attn_pytorch(value, ss, lsi, loc, attn)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    wide = torch.cat([value, value], dim=-1)[..., :16]  # non-contiguous view
    torch.testing.assert_close(ms_deform_attn(wide, ss, lsi, loc, attn), want, rtol=2e-5, atol=2e-5)
    half = ms_deform_attn(value.half(), ss, lsi, loc, attn)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), want, rtol=2e-3, atol=5e-3)
