"""The EBSeg model: parity with the official implementation, key manifests, batching, weights."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ebseg_core import (
    CheckpointError,
    EBSeg,
    UserError,
    Vocabulary,
    build_model,
    load_open_clip_weights,
    load_sam_weights,
    parity,
    preset_config,
)
from ebseg_core.data.synthetic import blob_image

REFERENCE = Path(os.environ.get("EBSEG_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
FIXTURE = REFERENCE / "parity_tiny_b"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"reference data missing at {path}; set EBSEG_REFERENCE_DIR to the shared/reference folder")
    return path


def test_parity_with_official_fixture(capsys):
    report = parity.run(_require(FIXTURE), atol=1e-4, rtol=1e-4)
    report.print()
    out = capsys.readouterr().out
    assert report.passed, out
    names = {n for n, _, _ in report.rows}
    # Every tensor the official run recorded was compared (none silently skipped), and all weighted training losses.
    from safetensors import safe_open
    with safe_open(str(FIXTURE / "eval_outputs.safetensors"), "pt") as f:
        recorded = set(f.keys())
    assert len(recorded) >= 100
    assert recorded <= names, sorted(recorded - names)
    assert sum(n.startswith("bs1.") for n in names) == 6
    assert sum(n.startswith("fixed.loss_weighted.") for n in names) == 41


def test_parity_cli_rejects_non_fixture(tmp_path, capsys):
    assert parity.main([str(tmp_path)]) == 2
    assert "not a parity fixture" in capsys.readouterr().err
    from jobs.cli import main as ebseg

    assert ebseg(["parity", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ebseg parity: error:") and "not a parity fixture" in err


@pytest.mark.parametrize("preset,manifest", [("ebseg-b", "ebseg_b_state_dict.json"), ("ebseg-l", "ebseg_l_state_dict.json")])
def test_state_dict_matches_official_manifest(preset, manifest):
    ref = json.loads(_require(REFERENCE / manifest).read_text())
    with torch.device("meta"):
        model = EBSeg(preset_config(preset))
    ours = model.state_dict()
    ignored = {"criterion.empty_weight"}  # constant buffer, recomputed by the criterion
    ref_entries = {e["key"]: e for e in ref["state_dict"] if e["key"] not in ignored}
    assert set(ours) == set(ref_entries)
    for key, e in ref_entries.items():
        assert list(ours[key].shape) == e["shape"], key
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, e in ref_entries.items():
        if e["kind"] == "param":
            assert params[key].requires_grad == e["requires_grad"], key
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert trainable == ref["totals"]["trainable_param_count_unique"]


def _tiny(**overrides) -> EBSeg:
    cfg = dataclasses.replace(preset_config("ebseg-tiny"), test_min_size=96, test_max_size=160, **overrides)
    torch.manual_seed(0)
    return build_model(cfg)


def test_segment_batched_equals_one_at_a_time():
    model = _tiny()
    vocab = Vocabulary.parse("sky,tree;trees,grass,road")
    images = [blob_image(h, w, seed=i, num_classes=4)[0] for i, (h, w) in
              enumerate([(120, 150), (118, 148), (96, 200), (130, 130)])]
    batched = model.segment(images, vocab.with_seen([True, True, False, False]), batch_size=4)
    single = [model.segment([img], vocab.with_seen([True, True, False, False]), batch_size=1)[0] for img in images]
    for img, a, b in zip(images, batched, single):
        assert a.label_map.shape == img.shape[:2]
        assert torch.equal(a.label_map, b.label_map)
        torch.testing.assert_close(a.confidence, b.confidence, atol=1e-5, rtol=1e-5)
        assert float(a.confidence.min()) >= 0 and float(a.confidence.max()) <= 1


def test_segment_scores_and_validation():
    model = _tiny()
    vocab = Vocabulary.parse("a,b,c").with_seen([True, False, True])
    img = blob_image(100, 120, seed=3, num_classes=3)[0]
    res = model.segment([img], vocab, return_scores=True)[0]
    assert res.scores.shape == (3, 100, 120)
    assert torch.equal(res.scores.argmax(0), res.label_map)
    with pytest.raises(ValueError, match="uint8 RGB"):
        model.segment([img.astype(np.float32)], vocab)


def _tiny_with_text_tower() -> EBSeg:
    clip = dataclasses.replace(preset_config("ebseg-tiny").clip, class_embeddings="tower")
    return _tiny(clip=clip)


def test_text_embeddings_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("EBSEG_CACHE_DIR", str(tmp_path))
    model = _tiny_with_text_tower()
    vocab = Vocabulary.parse("cat,dog")
    first = model.class_text_embeddings(vocab)
    files = list((tmp_path / "text_embeddings").glob("*.pt"))
    assert len(files) == 1
    fresh = _tiny_with_text_tower()
    calls = []
    monkeypatch.setattr(fresh.ov_classifier, "class_embeddings", lambda t: calls.append(t))
    torch.testing.assert_close(fresh.class_text_embeddings(vocab), first)
    assert calls == []  # served from disk, no text encoding


def test_name_hash_class_embeddings_are_far_apart_and_the_same_in_every_model(tmp_path, monkeypatch):
    """The tiny preset's stand-in for a trained text tower: distinct names get far-apart unit
    vectors (its random tower gives cosine 0.98+), a name gets one vector whatever model or process asks."""
    monkeypatch.setenv("EBSEG_CACHE_DIR", str(tmp_path))
    names = [f"class {i}" for i in range(12)]
    emb = _tiny().class_text_embeddings(Vocabulary.parse(",".join(names)))
    assert emb.shape == (12, preset_config("ebseg-tiny").clip.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(12))
    cosine = emb @ emb.T
    assert cosine[~torch.eye(12, dtype=torch.bool)].abs().max() < 0.7
    torch.manual_seed(123)  # other random weights, a reordered vocabulary, another spelling of a name
    other = build_model("ebseg-tiny").class_text_embeddings(Vocabulary.parse("Class  3,class 0"))
    torch.testing.assert_close(other, emb[[3, 0]])
    assert not list(tmp_path.rglob("*.pt"))  # nothing to cache: no tower runs

    tower = _tiny_with_text_tower().class_text_embeddings(Vocabulary.parse(",".join(names)))
    assert (tower @ tower.T).min() > 0.9  # why the stand-in exists (random tower: nearly one vector)


def test_unknown_class_embeddings_setting_is_refused():
    cfg = preset_config("ebseg-tiny")
    cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, class_embeddings="word2vec"))
    with pytest.raises(UserError, match="class_embeddings must be one of tower, name-hash"):
        build_model(cfg)


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = _tiny()
    path = tmp_path / "ebseg_tiny.pth"
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["criterion.empty_weight"] = torch.ones(13)
    torch.save({"model": state, "iteration": 7}, path)
    loaded = build_model(model.config, checkpoint=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    broken = dict(model.state_dict())
    broken.pop("sem_seg_head.predictor.query_feat.weight")
    broken["sem_seg_head.predictor.logit_scale"] = torch.ones(3)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        build_model(model.config, checkpoint=str(tmp_path / "broken.pth"))
    assert "sem_seg_head.predictor.query_feat.weight" in str(err.value)
    assert "sem_seg_head.predictor.logit_scale" in str(err.value)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable"):
        build_model(model.config, checkpoint=str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError):
        build_model(model.config, checkpoint=str(tmp_path / "absent.pth"))


def test_checkpoint_from_object_storage(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("EBSEG_CACHE_DIR", str(tmp_path / "cache"))
    model = _tiny()
    local = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, local)
    s3.fs.put(str(local), f"{s3.bucket}/ckpt/w.pth")
    loaded = build_model(model.config, checkpoint=s3.url("ckpt/w.pth"))
    assert torch.equal(loaded.state_dict()["sem_seg_head.predictor.query_feat.weight"],
                       model.state_dict()["sem_seg_head.predictor.query_feat.weight"])


def test_open_clip_weights_map_onto_both_towers():
    import open_clip

    cfg = preset_config("ebseg-tiny")
    c = cfg.clip
    torch.manual_seed(1)
    clip = open_clip.CLIP(
        embed_dim=c.embed_dim, quick_gelu=True,
        vision_cfg=dict(image_size=c.image_size, layers=c.vision_layers, width=c.vision_width,
                        head_width=c.vision_width // c.vision_heads, patch_size=c.patch_size),
        text_cfg=dict(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                      heads=c.text_heads, layers=c.text_layers)).eval()
    model = EBSeg(cfg)
    load_open_clip_weights(model, state=clip.state_dict())
    tokens = open_clip.tokenizer.tokenize(["a photo of a cat.", "a photo of a dog."])
    with torch.no_grad():
        torch.testing.assert_close(model.ov_classifier.encode_text(tokens),
                                   clip.encode_text(tokens, normalize=True), atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 3, c.image_size, c.image_size)
        out = model.clip_visual_extractor(x, inference=False)
        tokens_v = out["tokens"]
        for block in model.clip_rec_head.resblocks:
            tokens_v = block.forward_plain(tokens_v)
        ours = model.clip_rec_head.ln_post(tokens_v[0]) @ model.clip_rec_head.proj
        torch.testing.assert_close(ours, clip.encode_image(x), atol=1e-5, rtol=1e-5)


def test_sam_checkpoint_maps_onto_backbone(tmp_path):
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    cfg = dataclasses.replace(preset_config("ebseg-tiny"), sam=dataclasses.replace(preset_config("ebseg-tiny").sam, img_size=256))
    s = cfg.sam
    torch.manual_seed(2)
    enc = ImageEncoderViT(img_size=256, patch_size=16, embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          global_attn_indexes=s.global_attn_indexes, window_size=s.window_size, out_chans=16).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({f"image_encoder.{k}": v for k, v in enc.state_dict().items()}, tmp_path / "sam.pth")
    model = EBSeg(cfg)
    load_sam_weights(model, str(tmp_path / "sam.pth"))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = enc.patch_embed(x) + enc.pos_embed
        for blk in enc.blocks[: s.global_attn_indexes[2] + 1]:
            ref = blk(ref)
        torch.testing.assert_close(model.backbone(x)["res4"], ref.permute(0, 3, 1, 2))
    with pytest.raises(CheckpointError):
        torch.save({"image_encoder.pos_embed": torch.zeros(1)}, tmp_path / "bad.pth")
        load_sam_weights(model, str(tmp_path / "bad.pth"))


def test_autocast_bfloat16_stays_close_to_float32():
    model = _tiny()
    vocab = Vocabulary.parse("a,b,c").with_seen([True, False, True])
    images = [blob_image(100, 120, seed=s, num_classes=3)[0] for s in (7, 8)]
    full = model.segment(images, vocab, return_scores=True)
    half = model.segment(images, vocab, return_scores=True, precision="bf16")
    for a, b in zip(full, half):
        assert b.scores.dtype == torch.float32
        # bfloat16 keeps ~3 significant digits: scores agree to autocast noise, labels almost everywhere.
        relative = float((a.scores - b.scores).abs().mean() / a.scores.abs().mean())
        assert relative < 0.02, relative
        assert float((a.label_map == b.label_map).float().mean()) > 0.9


def test_precision_choice_maps_to_autocast():
    from ebseg_core.model import autocast_dtype_for

    assert autocast_dtype_for("fp32", "cpu") is None
    assert autocast_dtype_for("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype_for("fp16", "cuda") is torch.float16
    assert autocast_dtype_for("fp16", "cpu") is torch.float16
    assert autocast_dtype_for(None, "cpu") is None  # CPU default: fp32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast_dtype_for("fp8", "cpu")
    model = _tiny()
    vocab = Vocabulary.parse("a,b")
    image = blob_image(64, 80, seed=3, num_classes=2)[0]
    by_name = model.segment([image], vocab, return_scores=True, precision="bf16")[0]
    full = model.segment([image], vocab, return_scores=True, precision="fp32")[0]
    default = model.segment([image], vocab, return_scores=True)[0]  # auto: fp32 on CPU
    torch.testing.assert_close(default.scores, full.scores, rtol=0, atol=0)
    assert not torch.equal(by_name.scores, full.scores)  # bf16 really ran
    scores = model.forward_eval([model.prepare_image(image)], vocab, precision="bf16")[0]
    assert scores.dtype == torch.float32


def test_class_embedding_of_empty_mask_finite_under_float16_autocast():
    """An empty predicted mask (a query that predicts no object: most queries of a trained model) pools
    to zeros. Under float16 autocast on CPU the old pooling gave 0/0 = NaN (its 1e-8 guard is 0 in
    float16), which turned the labels of a trained model to noise."""
    model = _tiny()
    dec = model.sem_seg_head.predictor
    g = torch.Generator().manual_seed(0)
    q, hidden = model.config.decoder.num_queries, model.config.decoder.hidden_dim
    mask_dim = model.config.pixel_decoder.mask_dim
    decoder_output = torch.randn(1, q, hidden, generator=g)
    mask_features = torch.randn(1, mask_dim, 24, 20, generator=g)
    pred_mask = torch.randn(1, q, 24, 20, generator=g)
    pred_mask[0, : q // 2] = -1.0  # half the queries: no pixel > 0
    with torch.no_grad():
        full = dec._class_embedding(decoder_output, pred_mask, mask_features)
        with torch.autocast("cpu", dtype=torch.float16):
            half = dec._class_embedding(decoder_output.half(), pred_mask.half(), mask_features)
    assert bool(torch.isfinite(half).all())
    torch.testing.assert_close(half.float(), full, rtol=0.02, atol=0.02)


def test_float16_segment_matches_float32_with_empty_masks_and_large_logits():
    """Every mask empty (zero mask embeddings: mask logits exactly 0) and a large logit scale (class
    probabilities below float16's smallest value): fp16 segment scores stay finite and give fp32's
    labels. Fails when the mask pooling or the class ensemble runs in float16 on CPU (NaN)."""
    model = _tiny()
    last = model.sem_seg_head.predictor.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        model.ov_classifier.logit_scale.fill_(math.log(1000.0))
    vocab = Vocabulary.parse("a,b,c").with_seen([True, False, True])
    images = [blob_image(64, 80, seed=s, num_classes=3)[0] for s in (1, 2)]
    full = model.segment(images, vocab, return_scores=True, precision="fp32")
    half = model.segment(images, vocab, return_scores=True, precision="fp16")
    for a, b in zip(full, half):
        assert bool(torch.isfinite(b.scores).all()) and bool(torch.isfinite(b.confidence).all())
        assert float((a.label_map == b.label_map).float().mean()) > 0.99


def _textured(h: int, w: int, seed: int) -> np.ndarray:
    """A blob image with pixel noise: fine detail, where an un-antialiased downscale would differ."""
    img = blob_image(h, w, seed=seed, num_classes=4)[0].astype(np.int16)
    noise = np.random.default_rng(seed).integers(-40, 41, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(61, 83), (170, 230)])  # a downscale by ~0.4 and an upscale by ~1.1
def test_device_resize_within_one_level_of_pil(size):
    from ebseg_core.model import device_resize, pil_resize

    img = _textured(150, 205, seed=1)
    ref = pil_resize(img, size).astype(np.float32)
    ours = device_resize(torch.from_numpy(img).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)
    assert diff.max() <= 1, diff.max()  # PIL's fixed-point rounding, never the filter
    assert diff.mean() < 0.3, diff.mean()


def test_segment_resize_paths():
    from ebseg_core.model import device_resize, resized_shape

    model = _tiny()
    vocab = Vocabulary.parse("a,b,c").with_seen([True, False, True])
    img = _textured(150, 205, seed=2)  # resized to the tiny test size (96 short side)
    pil = model.segment([img], vocab, return_scores=True, resize="pil")[0]
    default = model.segment([img], vocab, return_scores=True)[0]  # CPU default: pil
    assert torch.equal(default.scores, pil.scores)
    # The pil path is the official chain: PIL resize, evaluation forward, label = argmax of the scores.
    official = model.forward_eval([model.prepare_image(img)], vocab, output_sizes=[img.shape[:2]])[0]
    torch.testing.assert_close(pil.scores, official, atol=1e-6, rtol=1e-5)
    assert torch.equal(pil.label_map, official.argmax(0))

    dev = model.segment([img], vocab, return_scores=True, resize="device")[0]
    size = resized_shape(*img.shape[:2], model.config.test_min_size, model.config.test_max_size)
    resized = device_resize(torch.from_numpy(img).permute(2, 0, 1), size)
    torch.testing.assert_close(dev.scores, model.forward_eval([resized], vocab, output_sizes=[img.shape[:2]])[0],
                               atol=1e-6, rtol=1e-5)
    assert not torch.equal(dev.scores, pil.scores)  # the device path really ran
    relative = float((dev.scores - pil.scores).abs().mean() / pil.scores.abs().mean())
    assert relative < 0.01, relative
    with pytest.raises(UserError, match="unknown resize 'gpu'"):
        model.segment([img], vocab, resize="gpu")


def test_decoder_attention_masks_equal_resized_full_resolution_masks():
    """The decoder thresholds mask logits computed from resized features; the official chain resizes each
    layer's full-resolution logits. Same masks (up to logits within rounding of the threshold), and the
    inference path (final prediction only) gives the final outputs of the all-predictions path."""
    import torch.nn.functional as F

    model = _tiny()
    dec = model.sem_seg_head.predictor
    g = torch.Generator().manual_seed(0)
    d = model.config.pixel_decoder
    multi_scale = [torch.randn(1, d.conv_dim, s, s + 2, generator=g) for s in (4, 8, 16)]
    mask_features = torch.randn(1, d.mask_dim, 32, 36, generator=g)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.append(args[2]))
             for layer in dec.transformer_cross_attention_layers]
    with torch.no_grad():
        full = dec(multi_scale, mask_features, all_predictions=True)
        masks_full = list(seen)
        seen.clear()
        final_only = dec(multi_scale, mask_features, all_predictions=False)
    for h in hooks:
        h.remove()
    assert len(masks_full) == dec.num_layers and all(torch.equal(a, b) for a, b in zip(masks_full, seen))
    for layer, allowed in enumerate(masks_full):
        level = multi_scale[layer % 3]
        logits = F.interpolate(full.pred_masks[layer], size=level.shape[-2:], mode="bilinear",
                               align_corners=False).flatten(2)
        expected = logits.sigmoid() >= 0.5
        expected |= ~expected.any(-1, keepdim=True)
        differ = allowed != expected
        assert expected.float().mean() not in (0.0, 1.0)  # a real mask, not all-or-nothing
        assert bool((logits[differ].abs() < 1e-4).all()), layer
    assert all(p is None for p in final_only.pred_masks[:-1])
    torch.testing.assert_close(final_only.pred_masks[-1], full.pred_masks[-1], rtol=0, atol=0)
    torch.testing.assert_close(final_only.attn_biases[-1], full.attn_biases[-1], rtol=0, atol=0)
    torch.testing.assert_close(final_only.mask_embeds[-1], full.mask_embeds[-1], rtol=0, atol=0)
