"""Unit tests of the EBSeg criterion on small synthetic tensors."""

import itertools

import pytest
import torch

from ebseg_core.criterion import (
    CriterionConfig,
    EBSegCriterion,
    FixedPointCoords,
    QueryTargetMatcher,
    RandomPointCoords,
    official_weight_dict,
    pad_target_masks,
    point_sample,
)


def _outputs(b=2, q=6, c=4, h=8, w=8, e=5, num_aux=2, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def one():
        return {
            "pred_logits": torch.randn(b, q, c + 1, generator=g, requires_grad=requires_grad),
            "pred_logits_1": torch.randn(b, q, c + 1, generator=g, requires_grad=requires_grad),
            "pred_masks": torch.randn(b, q, h, w, generator=g, requires_grad=requires_grad),
        }

    out = one()
    out["aux_outputs"] = [one() for _ in range(num_aux)]
    out["mask_embeds"] = torch.randn(b, q, e, generator=g, requires_grad=requires_grad)
    t = torch.nn.functional.normalize(torch.randn(c, e, generator=g), dim=-1)
    out["text_scoremap"] = t @ t.t()
    return out


def _targets(h=32, w=32):
    lab0 = torch.zeros(h, w, dtype=torch.long)
    lab0[: h // 2] = 1
    lab0[h // 2 :, : w // 2] = 3
    lab1 = torch.full((h, w), 2, dtype=torch.long)
    out = []
    for lab in (lab0, lab1):
        classes = lab.unique()
        out.append({"labels": classes, "masks": torch.stack([lab == k for k in classes])})
    return out


def test_point_sample_reads_pixel_centres():
    feat = torch.arange(12.0).view(1, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 3], -1)[None]
    assert torch.allclose(point_sample(feat, coords)[0, 0], feat.flatten(), atol=1e-5)
    # Outside the map: zero padding (bilinear with half weight at the border).
    assert point_sample(feat, torch.tensor([[[1.5, 1.5]]])).item() == 0.0


def test_matcher_is_optimal_against_brute_force():
    torch.manual_seed(0)
    q, k = 5, 3
    out = {"pred_logits": torch.randn(1, q, 5), "pred_masks": torch.randn(1, q, 8, 8)}
    tgt = [{"labels": torch.tensor([0, 2, 3]), "masks": torch.rand(k, 8, 8) > 0.5}]
    pts = torch.rand(1, 64, 2)
    provider = FixedPointCoords(pts, torch.rand(64, 2))
    matcher = QueryTargetMatcher(2.0, 5.0, 5.0, 64)
    rows, cols = matcher(out, tgt, points=provider)[0]
    # Recompute the cost matrix independently and check the assignment minimises it.
    prob = out["pred_logits"][0].softmax(-1)[:, tgt[0]["labels"]]
    om = point_sample(out["pred_masks"][0][:, None], pts.repeat(q, 1, 1))[:, 0]
    tm = point_sample(tgt[0]["masks"].float()[:, None], pts.repeat(k, 1, 1))[:, 0]
    bce = torch.stack(
        [torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(om[i], tm[j]) for j in range(k)]) for i in range(q)]
    )
    s = om.sigmoid()
    dice = torch.stack([torch.stack([1 - (2 * (s[i] * tm[j]).sum() + 1) / (s[i].sum() + tm[j].sum() + 1) for j in range(k)]) for i in range(q)])
    cost = 5 * bce + 5 * dice - 2 * prob
    best = min(itertools.permutations(range(q), k), key=lambda p: sum(cost[p[j], j] for j in range(k)))
    got = {int(c): int(r) for r, c in zip(rows, cols)}
    assert [got[j] for j in range(k)] == list(best)


def test_perfect_prediction_gives_small_losses_and_identity_match():
    tg = _targets(32, 32)
    b, q, c = 2, 6, 4
    logits = torch.full((b, q, c + 1), -10.0)
    logits[..., c] = 10.0  # unmatched queries predict no-object
    masks = torch.full((b, q, 8, 8), -20.0)
    for i, t in enumerate(tg):
        for j, (lab, m) in enumerate(zip(t["labels"], t["masks"])):
            logits[i, j] = -10.0
            logits[i, j, lab] = 10.0
            small = torch.nn.functional.interpolate(m[None, None].float(), size=(8, 8), mode="nearest")[0, 0]
            masks[i, j] = (small * 2 - 1) * 20
    out = {"pred_logits": logits, "pred_logits_1": logits.clone(), "pred_masks": masks}
    crit = EBSegCriterion(c, CriterionConfig(matcher_num_points=256, num_points=256, ssc_loss=False))
    torch.manual_seed(0)
    losses, indices = crit.unweighted(out, tg)
    for i, t in enumerate(tg):
        rows, cols = indices[-1][i]
        assert sorted(zip(cols.tolist(), rows.tolist())) == [(j, j) for j in range(len(t["labels"]))]
    assert losses["loss_ce"] < 1e-3 and losses["1_loss_ce"] < 1e-3
    assert losses["loss_dice"] < 0.15 and losses["loss_mask"] < 0.5  # only boundary points are off
    # A wrong class on a matched query must cost much more.
    out2 = {k: v.clone() for k, v in out.items()}
    out2["pred_logits"][0, 0] = out2["pred_logits"][0, 1]
    torch.manual_seed(0)
    assert crit.unweighted(out2, tg)[0]["loss_ce"] > 1.0


def test_ce_uses_no_object_weight():
    out = _outputs(num_aux=0)
    tg = _targets(8, 8)
    crit = EBSegCriterion(4, CriterionConfig(matcher_num_points=16, num_points=16, ssc_loss=False))
    torch.manual_seed(0)
    losses, indices = crit.unweighted(out, tg)
    target = torch.full((2, 6), 4)
    for i, (r, cidx) in enumerate(indices[-1]):
        target[i, r] = tg[i]["labels"][cidx]
    w = torch.tensor([1.0, 1, 1, 1, 0.1])
    lp = out["pred_logits"].log_softmax(-1)
    nll = -lp.gather(-1, target[..., None])[..., 0]
    expected = (nll * w[target]).sum() / w[target].sum()
    assert torch.allclose(losses["loss_ce"], expected, atol=1e-6)
    lp1 = out["pred_logits_1"].log_softmax(-1)
    nll1 = -lp1.gather(-1, target[..., None])[..., 0]
    assert torch.allclose(losses["1_loss_ce"], (nll1 * w[target]).sum() / w[target].sum(), atol=1e-6)


def test_weighted_keys_and_official_weights():
    out = _outputs(num_aux=9)
    crit = EBSegCriterion(4, CriterionConfig(matcher_num_points=16, num_points=16))
    losses = crit(out, _targets(8, 8))
    assert len(losses) == 41
    w = official_weight_dict(CriterionConfig(), 9)
    assert w["loss_ce"] == w["1_loss_ce_3"] == 1.5 and w["loss_mask_8"] == 5.0 and w["loss_dice"] == 5.0
    assert w["mse_ssc_loss_1"] == 10.0
    torch.manual_seed(3)
    unweighted, _ = crit.unweighted(out, _targets(8, 8))
    torch.manual_seed(3)
    weighted = crit(out, _targets(8, 8))
    for k, v in weighted.items():
        assert torch.allclose(v, unweighted[k] * w[k])


def test_ssc_loss_matches_manual_and_nan_guard():
    out = _outputs(num_aux=0)
    tg = _targets(8, 8)
    crit = EBSegCriterion(4, CriterionConfig(matcher_num_points=16, num_points=16))
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    got = crit.ssc_loss(out["mask_embeds"], tg, indices, out["text_scoremap"])
    per = []
    for b, (qi, ti) in enumerate(indices):
        e = out["mask_embeds"][b, qi]
        lab = tg[b]["labels"][ti]
        per.append(((e @ e.t() - out["text_scoremap"][lab][:, lab]) ** 2).mean())
    assert torch.allclose(got, (per[0] + per[1]) / 2)
    # An image without targets makes the official loss NaN -> the whole term is 0.
    empty = [tg[0], {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}]
    indices = [indices[0], (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))]
    assert crit.ssc_loss(out["mask_embeds"], empty, indices, out["text_scoremap"]).item() == 0.0


def test_image_without_targets_and_gradients():
    out = _outputs(num_aux=2, requires_grad=True)
    tg = _targets(8, 8)
    tg[1] = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    crit = EBSegCriterion(4, CriterionConfig(matcher_num_points=16, num_points=16))
    losses = crit(out, tg)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for t in (out["pred_logits"], out["pred_masks"], out["aux_outputs"][0]["pred_logits_1"]):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_random_points_consume_rand_in_official_order():
    """Same seed -> same coordinates as drawing the official shapes by hand."""
    logits = torch.randn(3, 1, 8, 8)
    torch.manual_seed(7)
    coords = RandomPointCoords().loss_points(0, logits, 40, 3.0, 0.75)
    torch.manual_seed(7)
    cand = torch.rand(3, 120, 2)
    rand = torch.rand(3, 10, 2)
    assert coords.shape == (3, 40, 2)
    assert torch.equal(coords[:, 30:], rand)
    # The first 30 are the most uncertain candidates (smallest |logit|).
    unc = point_sample(logits, cand).abs()[:, 0]
    for n in range(3):
        chosen = point_sample(logits[n : n + 1], coords[n : n + 1, :30]).abs().max()
        assert chosen <= unc[n].sort().values[29] + 1e-6


def test_user_errors_are_clear():
    crit = EBSegCriterion(3, CriterionConfig(matcher_num_points=16, num_points=16))
    with pytest.raises(ValueError, match="classes"):
        crit(_outputs(c=4, num_aux=0), _targets(8, 8))
    with pytest.raises(ValueError, match="oversample"):
        CriterionConfig(oversample_ratio=0.5)
    bad = _targets(8, 8)
    bad[0]["labels"] = torch.tensor([0, 9])
    with pytest.raises(ValueError, match="out of range"):
        EBSegCriterion(4, CriterionConfig(matcher_num_points=16, num_points=16))(_outputs(num_aux=0), bad)


def test_pad_target_masks_pads_bottom_right():
    t = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 3, 4, dtype=torch.bool)}]
    p = pad_target_masks(t, (5, 6))[0]["masks"]
    assert p.shape == (1, 5, 6) and p[0, :3, :4].all() and not p[0, 3:].any() and not p[0, :, 4:].any()


def _with_known(targets, known_maps):
    return [{**t, "known": k} for t, k in zip(targets, known_maps)]


def test_all_known_pixels_give_the_official_losses_and_matches():
    """A ``known`` map that is all True changes nothing: same losses, same assignment."""
    crit = EBSegCriterion(4, CriterionConfig(num_points=64, matcher_num_points=64))
    outputs, targets = _outputs(h=32, w=32), _targets()
    known = _with_known(targets, [torch.ones(32, 32, dtype=torch.bool)] * 2)
    torch.manual_seed(3)
    official, idx_official = crit.unweighted(outputs, targets)
    torch.manual_seed(3)
    with_map, idx_map = crit.unweighted(outputs, known)
    for key in official:
        assert torch.allclose(official[key], with_map[key], atol=1e-6), key
    for a, b in zip(idx_official, idx_map):
        assert all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_unknown_pixels_get_no_mask_gradient_and_do_not_change_the_loss():
    """Pseudo-label pixels marked unknown must not teach anything: predictions there leave the loss as is."""
    h = w = 32
    crit = EBSegCriterion(4, CriterionConfig(num_points=256, matcher_num_points=256, deep_supervision=False))
    known = torch.ones(h, w, dtype=torch.bool)
    known[:, w // 2:] = False  # the right half is unknown
    targets = _with_known(_targets(h, w), [known, known])
    outputs = _outputs(h=h, w=w, num_aux=0, requires_grad=True)
    points = FixedPointCoords(torch.rand(256, 2, generator=torch.Generator().manual_seed(1)),
                              torch.rand(256, 2, generator=torch.Generator().manual_seed(2)))
    losses, _ = crit.unweighted(outputs, targets, points)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    grad = outputs["pred_masks"].grad
    assert grad[..., : w // 2 - 1].abs().sum() > 0
    assert grad[..., w // 2 + 1:].abs().max() == 0  # bilinear reads may touch the column at the border only

    changed = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in outputs.items()}
    changed["pred_masks"][..., w // 2 + 1:] = torch.randn(2, 6, h, w - w // 2 - 1) * 10
    again, _ = crit.unweighted(changed, targets, points)
    for key in ("loss_mask", "loss_dice"):
        assert torch.allclose(losses[key], again[key], atol=1e-6), key
    # Without the map (the official rule) the same change does change the mask losses.
    plain = [{"labels": t["labels"], "masks": t["masks"]} for t in targets]
    a, _ = crit.unweighted({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in outputs.items()},
                           plain, points)
    b, _ = crit.unweighted(changed, plain, points)
    assert not torch.allclose(a["loss_mask"], b["loss_mask"])


def test_known_maps_are_padded_as_unknown_and_must_be_on_every_target():
    t = {"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 3, dtype=torch.bool),
         "known": torch.ones(2, 3, dtype=torch.bool)}
    padded = pad_target_masks([t], (4, 5))[0]
    assert padded["known"].shape == (4, 5)
    assert padded["known"][:2, :3].all() and not padded["known"][2:].any() and not padded["known"][:, 3:].any()
    crit = EBSegCriterion(4)
    targets = _targets(8, 8)
    with pytest.raises(ValueError, match="known"):
        crit(_outputs(), [{**targets[0], "known": torch.ones(8, 8, dtype=torch.bool)}, targets[1]])
