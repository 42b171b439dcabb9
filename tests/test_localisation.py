"""Localisation metrics: known answers on hand-built masks, agreement with Quantus 0.6, NaN for empty masks."""
import numpy as np
import pytest
import torch

from analyses import localisation as lo

METRICS = [lo.pointing_game, lo.relevance_mass, lo.relevance_rank, lo.attribution_localisation, lo.roc_auc]


def square_masks(batch=3, size=16):
    masks = torch.zeros(batch, size, size)
    masks[0, 2:8, 3:9] = 1
    masks[1, 8:16, 0:4] = 1
    masks[2, 5:6, 5:12] = 1
    return masks


@pytest.mark.parametrize("level", ["pixel", "patch"])
def test_mask_as_map_scores_one_and_inverted_zero(level):
    masks = square_masks()
    for fn in METRICS:
        assert torch.allclose(fn(masks, masks, level=level), torch.ones(3), atol=1e-6), fn.__name__
    seg = lo.segmentation_scores(masks, masks, level=level)
    for value in seg:
        assert torch.allclose(value, torch.ones(3), atol=1e-6)
    inverted = 1 - masks
    for fn in (lo.pointing_game, lo.relevance_mass, lo.relevance_rank, lo.attribution_localisation, lo.roc_auc):
        assert torch.allclose(fn(inverted, masks, level=level), torch.zeros(3), atol=1e-6), fn.__name__
    assert torch.allclose(lo.segmentation_scores(inverted, masks, level=level).miou, torch.zeros(3))


def test_constant_map_documented_values():
    masks = square_masks()
    fraction = masks.flatten(1).mean(-1)
    constant = torch.full_like(masks, 0.3)
    assert torch.equal(lo.pointing_game(constant, masks), torch.ones(3))
    assert torch.allclose(lo.relevance_mass(constant, masks), fraction)
    assert torch.allclose(lo.relevance_rank(constant, masks), fraction)
    assert torch.allclose(lo.top_k_intersection(constant, masks, k=50), fraction)
    assert torch.allclose(lo.roc_auc(constant, masks), torch.full((3,), 0.5))
    seg = lo.segmentation_scores(constant, masks)
    assert torch.allclose(seg.pixel_accuracy, 1 - fraction)
    assert torch.allclose(seg.miou, (1 - fraction) / 2)


def test_ignore_pixels_are_left_out_and_empty_masks_are_nan():
    masks = square_masks()
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    with_ignore = masks.clone()
    with_ignore[0, 10:, 10:] = float("nan")
    with_ignore[1, :2] = -1
    kept = ~(with_ignore.isnan() | (with_ignore < 0))
    for i in range(2):  # relevance mass over the valid pixels only, written plainly
        expected = (maps[i][kept[i]] * masks[i][kept[i]]).sum() / maps[i][kept[i]].sum()
        assert torch.isclose(lo.relevance_mass(maps, with_ignore)[i], expected)
    masks[2] = 0
    scores = lo.roc_auc(maps, masks)
    assert scores[2].isnan() and not scores[:2].isnan().any() and lo.count_nan(scores) == 1
    for fn in METRICS:
        assert fn(maps, masks)[2].isnan(), fn.__name__


def test_patch_level_uses_half_the_valid_pixels():
    masks = torch.zeros(1, 8, 8)
    masks[0, :4, :2] = 1  # patch (0, 0) of a 2x2 grid is half object -> object
    masks[0, 4:, 4:5] = 1  # patch (1, 1) a quarter -> background
    p = lo.prepare(torch.zeros(1, 2, 2), masks, level="patch")
    assert p.target.tolist() == [[True, False, False, False]]
    grid = lo.prepare(torch.zeros(1, 8, 8), masks, level="patch", grid=(2, 2))
    assert grid.scores.shape == (1, 4)


def quantus_inputs(seed=0, batch=4, size=12):
    rng = np.random.default_rng(seed)
    a = rng.random((batch, 1, size, size)).astype(np.float32)
    s = np.zeros((batch, 1, size, size), dtype=np.float32)
    for i in range(batch):
        top, left = rng.integers(0, size // 2, 2)
        s[i, 0, top:top + 4 + i, left:left + 3 + i] = 1
    x = rng.random((batch, 3, size, size)).astype(np.float32)
    return x, np.zeros(batch, dtype=int), a, s


@pytest.mark.parametrize("name, ours", [("PointingGame", lo.pointing_game),
                                        ("RelevanceMassAccuracy", lo.relevance_mass),
                                        ("RelevanceRankAccuracy", lo.relevance_rank),
                                        ("AttributionLocalisation", lo.attribution_localisation),
                                        ("AUC", lo.roc_auc)])
def test_agrees_with_quantus(name, ours):
    quantus = pytest.importorskip("quantus")
    x, y, a, s = quantus_inputs()
    metric = getattr(quantus, name)(normalise=False, abs=False, disable_warnings=True)
    expected = np.asarray(metric(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s), dtype=np.float64)
    got = ours(torch.from_numpy(a[:, 0]), torch.from_numpy(s[:, 0])).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_top_k_and_segmentation_agree_with_plain_computations():
    quantus = pytest.importorskip("quantus")
    from sklearn.metrics import average_precision_score

    x, y, a, s = quantus_inputs(seed=3)
    metric = quantus.TopKIntersection(k=20, normalise=False, disable_warnings=True)
    expected = metric(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s)
    got = lo.top_k_intersection(torch.from_numpy(a[:, 0]), torch.from_numpy(s[:, 0]), k=20)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    seg = lo.segmentation_scores(torch.from_numpy(a[:, 0]), torch.from_numpy(s[:, 0]))
    for i in range(len(a)):  # Chefer's recipe written out
        norm = (a[i, 0] - a[i, 0].min()) / (a[i, 0].max() - a[i, 0].min())
        pred, true = norm > norm.mean(), s[i, 0] > 0
        ious = [(pred & true).sum() / (pred | true).sum(), (~pred & ~true).sum() / (~pred | ~true).sum()]
        assert seg.pixel_accuracy[i] == pytest.approx((pred == true).mean(), abs=1e-6)
        assert seg.miou[i] == pytest.approx(np.mean(ious), abs=1e-6)
        ap = average_precision_score(np.concatenate([true, ~true]).ravel(), np.concatenate([norm, 1 - norm]).ravel())
        assert seg.map[i] == pytest.approx(ap, abs=1e-6)


def test_bad_input():
    masks = square_masks()
    with pytest.raises(ValueError, match="level"):
        lo.pointing_game(masks, masks, level="token")
    with pytest.raises(ValueError, match="same batch"):
        lo.pointing_game(masks[:2], masks)
    with pytest.raises(ValueError, match="0 \\(background\\), 1"):
        lo.relevance_mass(masks, masks * 2)
    with pytest.raises(ValueError, match="k=1000"):
        lo.top_k_intersection(masks, masks, k=1000, level="patch")


def test_oracle_at_the_patch_level_is_the_patch_mask_and_scores_one():
    masks = square_masks()  # 16 x 16 on a 4 x 4 grid: a patch is object when >= 8 of its 16 pixels are
    oracle = lo.oracle_maps(masks, grid=(4, 4))
    expected = (masks.view(3, 4, 4, 4, 4).sum((2, 4)) >= 8).float()
    assert torch.equal(oracle, expected)
    for fn in METRICS:  # image 2's 1-pixel strip covers no patch: empty at the patch level, NaN
        scores = fn(oracle, masks, level="patch")
        assert torch.allclose(scores[:2], torch.ones(2)) and scores[2].isnan(), fn.__name__
    # the pixel mask averaged over patches is not the best patch map: background patches keep some mass
    assert (lo.relevance_mass(lo.oracle_maps(masks), masks, level="patch", grid=(4, 4)) < 1).any()
