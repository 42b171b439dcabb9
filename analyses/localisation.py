"""Localisation metrics: how well an explanation map points at the object, scored against its segmentation mask.

Every metric takes maps ``[batch, h, w]`` at any resolution and masks ``[batch, H, W]`` in {0, 1}, with NaN or -1
marking ignore pixels (left out of both the object and its complement), and returns one score per image
``[batch]``. ``level="pixel"`` upsamples the maps bilinearly to the mask (as Chefer and Gandelsman do);
``level="patch"`` scores on the map's token grid, where a patch is object when at least half of its valid
pixels are (ecosystem spec §4.4). An image whose mask has no object pixel (or no background pixel, where the
metric needs one) scores NaN; :func:`count_nan` reports how many. The definitions equal Quantus 0.6's
(``PointingGame``, ``RelevanceMassAccuracy``, ``RelevanceRankAccuracy``, ``AttributionLocalisation``,
``TopKIntersection``, ``AUC``) on maps without ties and masks without ignore pixels; the docstrings say where
they differ. The segmentation scores follow Chefer et al.'s ImageNet-segmentation evaluation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LEVELS = ("pixel", "patch")


class Prepared(NamedTuple):
    """Maps and masks flattened to the scored features: ``scores`` [batch N] float, ``target`` [batch N] bool
    (object), ``valid`` [batch N] bool (not ignore)."""

    scores: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor


class SegmentationScores(NamedTuple):
    """Chefer et al.'s three segmentation scores, each [batch]: pixel accuracy, mIoU over {object, background},
    and mAP (one average precision over the map scoring the object and 1 - map scoring the background)."""

    pixel_accuracy: torch.Tensor
    miou: torch.Tensor
    map: torch.Tensor


def prepare(maps: torch.Tensor, masks: torch.Tensor, *, level: str = "pixel",
            grid: tuple[int, int] | None = None) -> Prepared:
    """Bring maps ``[batch, h, w]`` and masks ``[batch, H, W]`` to the features a metric scores.

    Pixel level: the maps are upsampled bilinearly (align_corners=False) to ``H x W``. Patch level: the masks go
    to the map grid, or to `grid` (pass the token grid for maps at the image resolution, such as ViT-CX's;
    the maps are then averaged over each patch): a patch is object when at least half of its valid pixels are object, and ignore
    when all its pixels are.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use one of {LEVELS}")
    if maps.ndim != 3 or masks.ndim != 3 or len(maps) != len(masks):
        raise ValueError(f"expected maps [batch, h, w] and masks [batch, H, W] of the same batch, got "
                         f"{tuple(maps.shape)} and {tuple(masks.shape)}")
    maps, masks = maps.detach().float(), masks.detach().float().to(maps.device)
    valid = ~(masks.isnan() | (masks < 0))
    target = (masks > 0.5) & valid
    if not ((masks[valid] == 0) | (masks[valid] == 1)).all():
        raise ValueError("masks must hold 0 (background), 1 (object) and NaN or -1 (ignore); got other values")
    if level == "pixel":
        if maps.shape[-2:] != masks.shape[-2:]:
            maps = F.interpolate(maps[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    else:
        grid = tuple(grid) if grid is not None else tuple(maps.shape[-2:])
        if grid[0] > masks.shape[-2] or grid[1] > masks.shape[-1]:
            raise ValueError(f"level='patch' scores on the token grid {grid}, which is finer than the masks "
                             f"{tuple(masks.shape[-2:])}; pass masks at the image resolution")
        if maps.shape[-2:] != grid:
            maps = F.adaptive_avg_pool2d(maps[:, None], grid)[:, 0]
        if masks.shape[-2:] != grid:
            fraction_valid = F.adaptive_avg_pool2d(valid[:, None].float(), grid)[:, 0]
            fraction_object = F.adaptive_avg_pool2d(target[:, None].float(), grid)[:, 0]
            valid = fraction_valid > 0
            target = valid & (fraction_object >= 0.5 * fraction_valid)
    n = len(maps)
    return Prepared(maps.reshape(n, -1), target.reshape(n, -1), valid.reshape(n, -1))


def _empty(p: Prepared, background: bool = False) -> torch.Tensor:
    """[batch] True where the mask has no object (or, with `background`, no background) feature."""
    empty = ~p.target.any(-1)
    return empty | ~(p.valid & ~p.target).any(-1) if background else empty


def _nan_where(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(where, float("nan"))


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, level: str = "pixel",
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Pointing game (Zhang et al. 2018) [batch]: 1.0 when any valid feature with the largest value lies in the
    object, else 0.0 (Quantus ``PointingGame``: no tolerance, ties count as a hit). A constant map scores 1.
    Empty masks give NaN (Quantus writes NaN into a boolean array, which turns it into a hit)."""
    p = prepare(maps, masks, level=level, grid=grid)
    scores = p.scores.masked_fill(~p.valid, -torch.inf)
    is_max = scores == scores.amax(-1, keepdim=True)
    return _nan_where((is_max & p.target).any(-1).float(), _empty(p))


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor, *, level: str = "pixel",
                   grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al. 2022) [batch]: Σ_object A⁺ / Σ A⁺ over valid features.

    Negative values are clipped to 0 first (Quantus ``RelevanceMassAccuracy`` sums them unless ``abs`` is set;
    the two agree on non-negative maps). A constant positive map scores |M| / N; a map that is 0 everywhere and
    an empty mask give NaN.
    """
    p = prepare(maps, masks, level=level, grid=grid)
    positive = p.scores.clamp(min=0) * p.valid
    return _nan_where((positive * p.target).sum(-1) / positive.sum(-1), _empty(p))


def attribution_localisation(maps: torch.Tensor, masks: torch.Tensor, *, level: str = "pixel",
                             grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Attribution localisation (Kohlbrenner et al. 2020) [batch]: Σ_object A⁺ / (Σ A⁺ + 1e-9), as Quantus
    ``AttributionLocalisation`` (positive attributions, unweighted): it equals :func:`relevance_mass` up to the
    1e-9, which makes an all-zero map score 0 instead of NaN. Empty masks give NaN."""
    p = prepare(maps, masks, level=level, grid=grid)
    positive = p.scores.clamp(min=0) * p.valid
    return _nan_where((positive * p.target).sum(-1) / (positive.sum(-1) + 1e-9), _empty(p))


def _top_k_hits(p: Prepared, k: torch.Tensor) -> torch.Tensor:
    """[batch] expected number of object features among the k largest valid scores, ties shared evenly (the
    mean over every tie-breaking order; Quantus's unstable argsort picks one)."""
    scores = p.scores.masked_fill(~p.valid, -torch.inf)
    ordered = scores.sort(-1, descending=True).values
    kth = ordered.gather(-1, (k - 1).clamp(min=0)[:, None])  # the k-th largest value
    above, tied = scores > kth, scores == kth
    slots = (k[:, None] - above.sum(-1, keepdim=True)).float()  # places left for the tied features
    share = slots / tied.sum(-1, keepdim=True).clamp(min=1)
    return ((above & p.target).sum(-1) + share[:, 0] * (tied & p.target).sum(-1)) * (k > 0)


def relevance_rank(maps: torch.Tensor, masks: torch.Tensor, *, level: str = "pixel",
                   grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Relevance rank accuracy (Arras et al. 2022) [batch]: with K = |M|, |top-K(A) ∩ M| / K (Quantus
    ``RelevanceRankAccuracy``). Ties at the K-th value share the remaining places evenly, so a constant map
    scores |M| / N. Empty masks give NaN."""
    p = prepare(maps, masks, level=level, grid=grid)
    k = p.target.sum(-1)
    return _nan_where(_top_k_hits(p, k) / k.clamp(min=1), _empty(p))


def top_k_intersection(maps: torch.Tensor, masks: torch.Tensor, *, k: int | float = 1000, level: str = "pixel",
                       grid: tuple[int, int] | None = None, concept_influence: bool = False) -> torch.Tensor:
    """Top-k intersection (Theiner et al. 2021) [batch]: the fraction of the `k` largest valid features that lie in
    the object (Quantus ``TopKIntersection``, default k = 1000). A float `k` in (0, 1) is a fraction of the valid
    features (e.g. 0.2 for the patch level). Ties share places evenly (a constant map scores |M| / N).
    `concept_influence` multiplies by N / |M|. Empty masks give NaN."""
    p = prepare(maps, masks, level=level, grid=grid)
    n_valid = p.valid.sum(-1)
    if isinstance(k, float):
        if not 0 < k < 1:
            raise ValueError(f"a float k is a fraction of the features and must lie in (0, 1), got {k}")
        k_each = (k * n_valid).round().long().clamp(min=1)
    else:
        if k < 1 or bool((n_valid < k).any()):
            raise ValueError(f"k={k} must be between 1 and the number of valid features "
                             f"({int(n_valid.min())} at level={level!r}); pass a smaller k or a fraction")
        k_each = torch.full_like(n_valid, k)
    scores = _top_k_hits(p, k_each) / k_each
    if concept_influence:
        scores = scores * n_valid / p.target.sum(-1).clamp(min=1)
    return _nan_where(scores, _empty(p))


def _average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """[batch N] 1-based ranks of each row in ascending order, ties given their mean rank (±inf sort last)."""
    ordered = scores.sort(-1).values
    below = torch.searchsorted(ordered, scores, right=False)
    upto = torch.searchsorted(ordered, scores, right=True)
    return (below + upto + 1).double() / 2


def roc_auc(maps: torch.Tensor, masks: torch.Tensor, *, level: str = "pixel",
            grid: tuple[int, int] | None = None) -> torch.Tensor:
    """ROC-AUC of the map as a score for the object [batch] (Quantus ``AUC``: sklearn's ``roc_curve`` + ``auc``),
    computed as the Mann-Whitney statistic with tied scores counted half, which equals the trapezoidal ROC area.
    A constant map scores 0.5; masks without object or without background give NaN."""
    p = prepare(maps, masks, level=level, grid=grid)
    scores = p.scores.double().masked_fill(~p.valid, torch.inf)  # ignore sorts after every valid value
    ranks = _average_ranks(scores)
    n_pos = p.target.sum(-1).double()
    n_neg = p.valid.sum(-1).double() - n_pos
    u = (ranks * p.target).sum(-1) - n_pos * (n_pos + 1) / 2
    return _nan_where((u / (n_pos * n_neg)).float(), _empty(p, background=True))


def _average_precision(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[batch] sklearn ``average_precision_score`` of each row: Σ_positives precision at the positive's score
    threshold / P, thresholds at the distinct scores (ties enter together). Invalid entries are left out."""
    scores = scores.double().masked_fill(~valid, -torch.inf)
    labels = labels & valid
    order = scores.argsort(-1, descending=True)
    ascending_neg = (-scores).gather(-1, order)  # ascending, for searchsorted
    true_positives = labels.gather(-1, order).double().cumsum(-1)
    end = torch.searchsorted(ascending_neg.contiguous(), (-scores).contiguous(), right=True) - 1  # tie group end
    precision = true_positives.gather(-1, end) / (end + 1)
    return ((precision * labels).sum(-1) / labels.sum(-1)).float()


def segmentation_scores(maps: torch.Tensor, masks: torch.Tensor, *, level: str = "pixel",
                        grid: tuple[int, int] | None = None) -> SegmentationScores:
    """Chefer et al. 2021's segmentation scores, per image (each [batch], see :class:`SegmentationScores`).

    The map is min-max normalised over the valid features and thresholded at its mean: object where
    A > mean(A). Pixel accuracy = the fraction of valid features predicted right; mIoU = the mean of the object
    and background IoUs; mAP = one average precision over the features scored twice, A for the object and 1 - A
    for the background (their ``get_ap_scores``). Chefer averages IoU over the dataset (Σ intersections /
    Σ unions); here it is per image, aggregated later. A constant map normalises to 0 and predicts background
    everywhere: pixel accuracy 1 - |M|/N, mIoU (1 - |M|/N) / 2. Empty masks give NaN.
    """
    p = prepare(maps, masks, level=level, grid=grid)
    inf = torch.tensor(torch.inf, device=p.scores.device)
    low = torch.where(p.valid, p.scores, inf).amin(-1, keepdim=True)
    high = torch.where(p.valid, p.scores, -inf).amax(-1, keepdim=True)
    norm = ((p.scores - low) / (high - low)).nan_to_num(0.0, 0.0, 0.0) * p.valid
    n_valid = p.valid.sum(-1)
    threshold = norm.sum(-1, keepdim=True) / n_valid[:, None]
    predicted = (norm > threshold) & p.valid
    accuracy = ((predicted == p.target) & p.valid).sum(-1) / n_valid
    ious = []
    for pred, true in ((predicted, p.target), (~predicted & p.valid, ~p.target & p.valid)):
        union = (pred | true).sum(-1)
        ious.append((pred & true).sum(-1) / union.clamp(min=1))
    miou = (ious[0] + ious[1]) / 2
    average_precision = _average_precision(torch.cat([norm, 1 - norm], -1), torch.cat([p.target, ~p.target], -1),
                                           torch.cat([p.valid, p.valid], -1))
    empty = _empty(p)
    return SegmentationScores(_nan_where(accuracy.float(), empty), _nan_where(miou.float(), empty),
                              _nan_where(average_precision, empty))


def count_nan(scores: torch.Tensor) -> int:
    """How many images scored NaN (empty masks), to report next to the means."""
    return int(scores.isnan().sum())


# ---- baselines --------------------------------------------------------------------------------------------------

def random_maps(shape: tuple[int, int, int], *, seed: int = 0) -> torch.Tensor:
    """Chance baseline [batch h w]: uniform noise from a CPU generator seeded with `seed`."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def centre_prior(shape: tuple[int, int, int]) -> torch.Tensor:
    """Centre-bias baseline [batch h w]: an isotropic Gaussian at the image centre (σ = a quarter of the side),
    the photographer's bias that object-centred datasets reward."""
    batch, h, w = shape
    ys = (torch.arange(h) + 0.5) / h - 0.5
    xs = (torch.arange(w) + 0.5) / w - 0.5
    prior = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * 0.25 ** 2))
    return prior.expand(batch, h, w).clone()


def oracle_maps(masks: torch.Tensor, *, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The best possible map: the object mask itself [batch H W] (ignore pixels 0), or with `grid` the patch-level
    mask [batch grid_h grid_w] (1 where a patch is object, as :func:`prepare` decides), which scores 1 on every
    localisation metric at ``level="patch"`` (the averaged pixel mask would not: partly covered background
    patches carry mass)."""
    masks = masks.float()
    if grid is not None:
        target = prepare(torch.zeros(len(masks), *grid, device=masks.device), masks, level="patch", grid=grid).target
        return target.float().view(len(masks), *grid)
    return torch.where(masks.isnan() | (masks < 0), torch.zeros_like(masks), masks)


def pixel_masks(dataset, indices) -> torch.Tensor:
    """The class masks of dataset items at the model input's resolution, [n H W]: 1 object, 0 background, NaN
    ignore. They follow the image's resize and crop (the dataset's data config), sampled as cv2 INTER_NEAREST.

    A dataset without masks (no ``mask_path`` column, or a sample without a mask file) is an error.
    """
    from vitlens.data.masks import IGNORE_ID, decode_segmentation, input_box, token_mask

    samples = getattr(dataset, "samples", None)
    if samples is None or "mask_path" not in samples.columns:
        raise ValueError("the dataset has no segmentation masks (no mask_path column); localisation needs "
                         "ImageNet-S (validation split) or the bundled scenes")
    config = getattr(dataset, "data_config", None)
    size = tuple(config["input_size"][-2:])
    out = []
    for i in indices:
        row = samples.iloc[int(i)]
        if not isinstance(row["mask_path"], str):
            raise ValueError(f"sample {row['sample_id']} has no segmentation mask; use the validation split")
        ids = decode_segmentation(row["mask_path"])
        box = input_box(ids.shape, config)
        mask = token_mask(ids, int(row["seg_id"]), size, box, "nearest")
        out.append(mask.masked_fill(token_mask(ids, IGNORE_ID, size, box, "nearest") > 0, float("nan")))
    return torch.stack(out)
