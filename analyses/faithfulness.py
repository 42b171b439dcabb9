"""Faithfulness metrics: does the model's output fall when the features a map ranks highest are removed?

Deletion and insertion curves (Petsiuk et al. 2018), region perturbation / AOPC (Samek et al. 2017), ROAD with
noisy linear imputation (Rong et al. 2022), Chefer et al.'s positive/negative perturbation and vit-cls_emb's
token-removal curves (tokens dropped, not pixels replaced), all over maps
``[batch, h, w]`` on the model's token grid or at the image resolution. Every curve is computed in large batches:
the perturbed images of all steps of all images are built chunk by chunk on the device and go through the model
together, never one Python forward per step. Features are patches of the token grid (``level="patch"``) or pixels
(``level="pixel"``, the map upsampled bilinearly); removed features take a baseline (zero, black, the image mean,
a blur, or DiffMask's uniform noise in [-1, 1]). The score is the target's softmax probability by default
(``output=``: "probability", "logit", "cross_entropy" (= -log p, DiffMask's "KLD") or "accuracy"), and the AUC is
the trapezoid rule over the removed fraction in [0, 1] (``compat=True``: ``np.trapz`` with unit spacing, as the
DiffMask notebook and Quantus compute it). Definitions follow ecosystem spec §4.4. Scoring a store of maps with
these (``evaluate``, ``summarise``, ``plot``, ``cli``) is :mod:`analyses.benchmark`, re-exported here.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from analyses.explain import resolve_target

BASELINES = ("zero", "black", "mean", "blur", "uniform")
OUTPUTS = ("probability", "logit", "cross_entropy", "accuracy")
ORDERS = ("morf", "lerf", "random")
LEVELS = ("patch", "pixel")


class Curves(NamedTuple):
    """``curves`` [batch, steps + 1] (the score after each step, step 0 unperturbed for deletion) and ``auc``
    [batch]."""

    curves: torch.Tensor
    auc: torch.Tensor


def auc(curves: torch.Tensor, x: torch.Tensor | None = None, *, compat: bool = False) -> torch.Tensor:
    """Area under curves [batch, points] by the trapezoid rule over `x` (default: evenly spaced in [0, 1]).

    ``compat=True``: unit spacing, ``np.trapz(curve)`` as the DiffMask notebook and Quantus's ``calculate_auc``.
    """
    if compat:
        return torch.trapezoid(curves, dx=1.0, dim=-1)
    if x is None:
        x = torch.linspace(0, 1, curves.shape[-1], dtype=curves.dtype, device=curves.device)
    return torch.trapezoid(curves, x.to(curves), dim=-1)


def baseline_images(images: torch.Tensor, baseline: str | float | torch.Tensor, *, data_config: dict | None = None,
                    seed: int = 123) -> torch.Tensor:
    """What removed features become, [batch C H W] in the model's input space.

    "zero": 0 (the dataset mean after normalisation); "black": a 0 pixel before normalisation ((0 - mean) / std
    of `data_config`, Chefer's perturbation); "mean": each image's per-channel mean; "blur": a Gaussian blur
    (kernel 11, σ 5, Petsiuk's insertion); "uniform": uniform noise in [-1, 1] from a CPU generator seeded with
    `seed`, the same field for every image (DiffMask re-seeds 123 before each image); a float or a tensor is
    used as given.
    """
    if isinstance(baseline, torch.Tensor):
        return baseline.to(images).expand_as(images)
    if isinstance(baseline, (int, float)):
        return torch.full_like(images, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "black":
        if data_config is None:
            raise ValueError("baseline 'black' needs the model's data_config (mean and std)")
        mean = torch.tensor(data_config["mean"]).to(images)[:, None, None]
        std = torch.tensor(data_config["std"]).to(images)[:, None, None]
        return (-mean / std).expand_as(images).clone()
    if baseline == "mean":
        return images.mean((-2, -1), keepdim=True).expand_as(images).clone()
    if baseline == "blur":
        ax = torch.arange(11, dtype=images.dtype, device=images.device) - 5
        kernel = torch.exp(-ax ** 2 / (2 * 5.0 ** 2))
        kernel = kernel / kernel.sum()
        c = images.shape[1]
        padded = F.pad(images, (5, 5, 5, 5), mode="reflect")
        blurred = F.conv2d(padded, kernel.view(1, 1, 1, 11).expand(c, 1, 1, 11), groups=c)
        return F.conv2d(blurred, kernel.view(1, 1, 11, 1).expand(c, 1, 11, 1), groups=c)
    if baseline == "uniform":
        noise = torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return noise.to(images).expand_as(images).clone()
    raise ValueError(f"unknown baseline {baseline!r}; use one of {BASELINES}, a float or a tensor")


def feature_scores(model, images: torch.Tensor, maps: torch.Tensor, level: str) -> tuple[torch.Tensor, tuple]:
    """The map as one score per feature, [batch N], and the feature grid (rows, cols).

    Maps must be on the model's token grid for these images or at the image resolution. Patch level averages a
    pixel map over each patch; pixel level upsamples a token map bilinearly (align_corners=False).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use one of {LEVELS}")
    if images.ndim != 4 or maps.ndim != 3 or len(maps) != len(images):
        raise ValueError(f"expected images [batch C H W] and maps [batch h w] of the same batch, got "
                         f"{tuple(images.shape)} and {tuple(maps.shape)}")
    grid = tuple(model.layout_for(images).grid)
    size = tuple(images.shape[-2:])
    if tuple(maps.shape[-2:]) not in (grid, size):
        raise ValueError(f"maps of {tuple(maps.shape[-2:])} match neither the model's token grid {grid} nor the "
                         f"image size {size}; pass maps on the token grid or at the image resolution")
    maps = maps.detach().float().to(images.device)
    target = grid if level == "patch" else size
    if maps.shape[-2:] != target:
        if level == "patch":
            maps = F.adaptive_avg_pool2d(maps[:, None], grid)[:, 0]
        else:
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps.reshape(len(maps), -1), target


def feature_positions(scores: torch.Tensor, order: str, *, seed: int = 0) -> torch.Tensor:
    """[batch N] the step position of each feature: 0 is removed first. "morf": highest score first, "lerf":
    lowest first (stable: ties keep raster order), "random": a permutation from a generator seeded with `seed`."""
    if order == "morf":
        ranking = scores.argsort(dim=-1, descending=True, stable=True)
    elif order == "lerf":
        ranking = scores.argsort(dim=-1, stable=True)
    elif order == "random":
        generator = torch.Generator().manual_seed(seed)
        ranking = torch.stack([torch.randperm(scores.shape[-1], generator=generator) for _ in scores]).to(scores.device)
    else:
        raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")
    positions = torch.empty_like(ranking)
    positions.scatter_(-1, ranking, torch.arange(scores.shape[-1], device=scores.device).expand_as(ranking))
    return positions


def _score(logits: torch.Tensor, target: torch.Tensor, output: str) -> torch.Tensor:
    if output == "logit":
        return logits.gather(-1, target[:, None])[:, 0]
    if output == "probability":
        return logits.float().softmax(-1).gather(-1, target[:, None])[:, 0]
    if output == "cross_entropy":
        return -logits.float().log_softmax(-1).gather(-1, target[:, None])[:, 0]
    if output == "accuracy":
        return (logits.argmax(-1) == target).float()
    raise ValueError(f"unknown output {output!r}; use one of {OUTPUTS}")


Fill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""fill(images [n C H W], removed [n 1 H W] bool, rows [n] image indices) -> perturbed images [n C H W]."""


def _run_curves(model, images: torch.Tensor, positions: torch.Tensor, grid: tuple, target: torch.Tensor,
                runs: list[tuple[torch.Tensor, bool]], fill: Fill, output: str, batch_size: int) -> list[torch.Tensor]:
    """Score every (image, step) of every run in batches of `batch_size` through the model.

    runs: (counts [steps + 1] of features removed at each step, insert?) each. In an insertion run the features
    ranked below the count are the original ones and the rest are removed. Steps that show the unperturbed
    image, or no original feature, are computed once per image and shared by all runs.
    Returns one [batch, steps + 1] tensor per run.
    """
    n_images, n_features = positions.shape
    jobs: dict[tuple[int, int], int] = {}  # (image, features removed first-k kept) -> job index
    keys: list[tuple[int, int, bool]] = []
    layout = []
    for counts, insert in runs:
        run_keys = []
        for count in counts.tolist():
            # canonical key: k removed features (deletion) or N - k removed (insertion of k)
            kind = (n_features - count, True) if insert else (count, False)
            if kind[0] in (0, n_features):  # unperturbed or fully removed: the same image for every run
                kind = (kind[0], False) if kind[0] == 0 else (n_features, False)
            for b in range(n_images):
                key = (b, *kind)
                if key not in jobs:
                    jobs[key] = len(keys)
                    keys.append(key)
            run_keys.append(kind)
        layout.append(run_keys)
    scores = torch.empty(len(keys), device=images.device)
    scale = (images.shape[-2] // grid[0], images.shape[-1] // grid[1])
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            rows = torch.tensor([k[0] for k in chunk], device=images.device)
            removed_count = torch.tensor([k[1] for k in chunk], device=images.device)
            from_end = torch.tensor([k[2] for k in chunk], device=images.device)
            pos = positions[rows]
            # deletion: the first `count` positions are removed; insertion (from_end): all but the first N - count
            removed = torch.where(from_end[:, None], pos >= n_features - removed_count[:, None],
                                  pos < removed_count[:, None])
            removed = removed.view(len(chunk), 1, *grid)
            if scale != (1, 1):
                removed = removed.repeat_interleave(scale[0], -2).repeat_interleave(scale[1], -1)
            logits = model(fill(images[rows], removed, rows))
            scores[start:start + len(chunk)] = _score(logits, target[rows], output).float()
    results = []
    for run_keys in layout:
        index = torch.tensor([[jobs[(b, *kind)] for kind in run_keys] for b in range(n_images)], device=images.device)
        results.append(scores[index])
    return results


def _targets(model, images: torch.Tensor, target) -> torch.Tensor:
    """`target` (an int or [batch] classes) as [batch] long, checked: integer classes in range, one per image."""
    return resolve_target(target, len(images), model.cfg.d_vocab, images.device)


def _setup(model, images, maps, target, level, order, seed):
    target = _targets(model, images, target)
    scores, grid = feature_scores(model, images, maps, level)
    return scores, grid, feature_positions(scores, order, seed=seed), target


def _baseline_fill(base: torch.Tensor) -> Fill:
    return lambda x, removed, rows: torch.where(removed, base[rows], x)


def _counts(n_features: int, steps: int, device) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be a positive number of perturbation steps, got {steps}")
    return torch.round(torch.arange(steps + 1, device=device) * n_features / steps).long()


def deletion_insertion(model, images: torch.Tensor, maps: torch.Tensor, target, *, steps: int = 20,
                       baseline: str | float | torch.Tensor = "zero", level: str = "patch", order: str = "morf",
                       output: str = "probability", compat: bool = False, batch_size: int = 64,
                       seed: int = 123) -> dict[str, Curves]:
    """Deletion and insertion together, sharing their end points: ``2 * steps`` forwards per image.

    images [batch C H W] (the model's input space), maps [batch h w], target an int or [batch] classes. Returns
    ``{"deletion": Curves, "insertion": Curves}``; see :func:`deletion` and :func:`insertion`.
    """
    deleted, inserted = _baseline_curves(model, images, maps, target, (False, True), steps, baseline, level, order,
                                         output, compat, batch_size, seed)
    return {"deletion": deleted, "insertion": inserted}


def deletion(model, images: torch.Tensor, maps: torch.Tensor, target, *, steps: int = 20,
             baseline: str | float | torch.Tensor = "zero", level: str = "patch", order: str = "morf",
             output: str = "probability", compat: bool = False, batch_size: int = 64, seed: int = 123) -> Curves:
    """Deletion curve and AUC (Petsiuk et al. 2018; lower is better for MoRF).

    Features (patches of the token grid, or pixels) are ordered by the map (`order` "morf": most relevant first,
    "lerf", "random"); at step k of `steps` the first round(k N / steps) are replaced by the `baseline` (see
    :func:`baseline_images`) and the target's `output` is recorded (default the softmax probability). Returns
    ``(curves [batch, steps + 1], auc [batch])``; step 0 is the unperturbed image. Quantus ``PixelFlipping`` is
    this curve at the pixel level without step 0 (``features_in_step`` = C N / steps, its map broadcast over
    channels), with its AUC by unit spacing (``compat=True``).

    DiffMask's notebook curves: ``level="pixel", baseline="uniform", steps=28`` on the predicted class, "acc" =
    ``output="probability"`` and "KLD" = ``output="cross_entropy"`` (a cross-entropy, not a KL divergence), its
    "positive" = ``order="morf"`` and "negative" = ``order="lerf"``, AUC with ``compat=True``.
    """
    return _baseline_curves(model, images, maps, target, (False,), steps, baseline, level, order, output, compat,
                            batch_size, seed)[0]


def insertion(model, images: torch.Tensor, maps: torch.Tensor, target, *, steps: int = 20,
              baseline: str | float | torch.Tensor = "zero", level: str = "patch", order: str = "morf",
              output: str = "probability", compat: bool = False, batch_size: int = 64, seed: int = 123) -> Curves:
    """Insertion curve and AUC (higher is better for MoRF): start from the `baseline` image and put back the
    first round(k N / steps) features in map order at step k. Same arguments and returns as :func:`deletion`;
    step 0 is the baseline image and the last step the unperturbed one. Quantus has no insertion metric."""
    return _baseline_curves(model, images, maps, target, (True,), steps, baseline, level, order, output, compat,
                            batch_size, seed)[0]


def _baseline_curves(model, images, maps, target, inserts, steps, baseline, level, order, output, compat, batch_size,
                     seed) -> list[Curves]:
    """Deletion (False) or insertion (True) curves for each of `inserts`, in one :func:`_run_curves` pass."""
    scores, grid, positions, target = _setup(model, images, maps, target, level, order, seed)
    base = baseline_images(images, baseline, data_config=getattr(model, "data_config", None), seed=seed)
    counts = _counts(scores.shape[-1], steps, images.device)
    runs = _run_curves(model, images, positions, grid, target, [(counts, insert) for insert in inserts],
                       _baseline_fill(base), output, batch_size)
    return [Curves(curves, auc(curves, compat=compat)) for curves in runs]


def aopc(model, images: torch.Tensor, maps: torch.Tensor, target, *, regions: int | None = None,
         baseline: str | float | torch.Tensor = "uniform", order: str = "morf", output: str = "probability",
         batch_size: int = 64, seed: int = 123) -> Curves:
    """Region perturbation and its AOPC (Samek et al. 2017; Quantus ``RegionPerturbation``; higher is better for
    MoRF). Regions are the model's patches, ranked by the map's sum over each; they are removed one by one for
    `regions` steps (default all). Returns ``(curves [batch, regions + 1], aopc [batch])`` where curve k =
    f(x) - f(x with k regions removed) (Quantus's result without its k = 0 point) and AOPC = the mean over
    k = 0..regions as in Samek et al. Quantus's default baseline is "black" (the image minimum); here "uniform"
    noise is the default, as Samek et al.
    """
    scores, grid, positions, target = _setup(model, images, maps, target, "patch", order, seed)
    n = scores.shape[-1] if regions is None else regions
    if not 1 <= n <= scores.shape[-1]:
        raise ValueError(f"regions must be between 1 and the {scores.shape[-1]} patches, got {regions}")
    base = baseline_images(images, baseline, data_config=getattr(model, "data_config", None), seed=seed)
    (curves,) = _run_curves(model, images, positions, grid, target, [(torch.arange(n + 1), False)],
                            _baseline_fill(base), output, batch_size)
    drops = curves[:, :1] - curves
    return Curves(drops, drops.mean(-1))


def noisy_linear_imputation(images: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.01,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022) [n C H W]: every removed pixel becomes the weighted mean
    of its 8 neighbours (weight 1/6 for the 4 direct ones, 1/12 for the diagonals), solved jointly as one sparse
    linear system for all removed pixels of all images (scipy), plus Gaussian noise of std `noise`.

    removed: [n 1 H W] or [n H W] bool.
    """
    n, c, h, w = images.shape
    removed = removed.reshape(n, h, w).cpu().numpy()
    x = images.detach().double().cpu().numpy()
    index = -np.ones((n, h, w), dtype=np.int64)
    unknown = np.argwhere(removed)
    if len(unknown) == 0:
        return images.clone()
    index[removed] = np.arange(len(unknown))
    rows, cols, vals = [np.arange(len(unknown))], [np.arange(len(unknown))], []
    diagonal = np.zeros(len(unknown))
    rhs = np.zeros((len(unknown), c))
    b, i, j = unknown.T
    for di, dj, weight in [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
                           (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]:
        ni, nj = i + di, j + dj
        inside = (ni >= 0) & (ni < h) & (nj >= 0) & (nj < w)
        diagonal[inside] += weight
        ii, nbi, nbj, nb = np.nonzero(inside)[0], ni[inside], nj[inside], b[inside]
        neighbour = index[nb, nbi, nbj]
        is_unknown = neighbour >= 0
        rows.append(ii[is_unknown])
        cols.append(neighbour[is_unknown])
        vals.append(np.full(int(is_unknown.sum()), -weight))
        rhs[ii[~is_unknown]] += weight * x[nb[~is_unknown], :, nbi[~is_unknown], nbj[~is_unknown]]
    matrix = scipy.sparse.csr_matrix((np.concatenate([diagonal] + vals), (np.concatenate(rows), np.concatenate(cols))),
                                     shape=(len(unknown), len(unknown)))
    solution = scipy.sparse.linalg.spsolve(matrix.tocsc(), rhs).reshape(len(unknown), c)
    out = images.detach().clone()
    values = torch.from_numpy(solution).to(out)
    values = values + noise * torch.randn(values.shape, generator=generator).to(out)
    out[torch.from_numpy(b), :, torch.from_numpy(i), torch.from_numpy(j)] = values
    return out


def road(model, images: torch.Tensor, maps: torch.Tensor, target, *, percentages=tuple(range(1, 100, 2)),
         order: str = "morf", output: str = "accuracy", noise: float = 0.01, batch_size: int = 64,
         seed: int = 123) -> Curves:
    """ROAD (Rong et al. 2022; Quantus ``ROAD``): remove the top (MoRF) or bottom (LeRF) p% of pixels for each p in
    `percentages`, fill them by :func:`noisy_linear_imputation`, and record `output` (default top-1 accuracy
    against `target`, as Quantus). Returns ``(curves [batch, len(percentages)], auc over p/100)``. MoRF: lower is
    better; LeRF: higher; ``ROADCombined`` = (LeRF - MoRF) / 2."""
    scores, grid, positions, target = _setup(model, images, maps, target, "pixel", order, seed)
    fractions = torch.tensor([float(p) for p in percentages]) / 100
    if not len(fractions) or not ((fractions > 0) & (fractions < 1)).all():
        raise ValueError(f"percentages must lie in (0, 100), got {list(percentages)}")
    counts = torch.round(fractions * scores.shape[-1]).long()
    generator = torch.Generator().manual_seed(seed)

    def impute(x, removed, rows):
        return noisy_linear_imputation(x, removed, noise=noise, generator=generator).to(x)

    (curves,) = _run_curves(model, images, positions, grid, target, [(counts, False)], impute, output, batch_size)
    return Curves(curves, auc(curves, fractions.to(curves)))


def positive_negative(model, images: torch.Tensor, maps: torch.Tensor, target, *, steps: int = 10,
                      output: str = "accuracy", batch_size: int = 64) -> dict[str, Curves]:
    """Chefer et al. 2021's positive and negative perturbation: for k = 0, 10, ..., 90% the top-k (positive) or
    bottom-k (negative) pixels of the bilinearly upsampled map are set to 0 before normalisation (baseline
    "black") and the top-1 accuracy against `target` is recorded. Returns ``{"positive": Curves, "negative":
    Curves}``, AUC over the fraction in [0, 0.9]; positive: lower is better, negative: higher."""
    target = _targets(model, images, target)
    scores, grid = feature_scores(model, images, maps, "pixel")
    counts = _counts(scores.shape[-1], steps, images.device)[:-1]
    fill = _baseline_fill(baseline_images(images, "black", data_config=model.data_config))
    out = {}
    for name, order in (("positive", "morf"), ("negative", "lerf")):
        (curves,) = _run_curves(model, images, feature_positions(scores, order), grid, target, [(counts, False)],
                                fill, output, batch_size)
        out[name] = Curves(curves, auc(curves, torch.arange(steps) / steps))
    return out



def token_removal(model, images: torch.Tensor, maps: torch.Tensor, target, *, order: str = "negative",
                  compat: bool = False, batch_size: int = 256) -> tuple[torch.Tensor, float]:
    """vit-cls_emb's keep-top-n token-removal curve (§A9), by dropping tokens, from
    :func:`analyses.saliency.token_removal_curve`: accuracy over the batch [patches - 1] for n = 1..N-1 kept
    patches ("negative": the highest-scored kept; "positive": the lowest). Maps on the token grid or at the image
    resolution (averaged over each patch). AUC, one number for the batch: the mean accuracy over the kept
    fraction (:func:`analyses.saliency.auc`), or with ``compat=True`` the study's Σacc / (max(acc) · N)."""
    from analyses import saliency

    target = _targets(model, images, target)
    scores, _ = feature_scores(model, images, maps, "patch")
    curve = saliency.token_removal_curve(model, images, target, scores, order=order, batch_size=batch_size)
    return curve, (saliency.auc_study(curve) if compat else saliency.auc(curve))


def token_removal_auc(model, images: torch.Tensor, maps: torch.Tensor, target, *, order: str = "negative",
                      batch_size: int = 256) -> torch.Tensor:
    """The token-removal AUC of each image, [batch]: the plain AUC of :func:`token_removal` on the image alone
    (its curve is 0 or 1 at each n). The plain AUC is linear in the curve, so the mean over images equals the
    AUC of the batch's curve; the study's AUC (``compat=True`` of :func:`token_removal`) divides by the curve's
    maximum and exists only for a whole set. The N - 1 kept sets of all images go through the model together,
    up to `batch_size` rows per call (:func:`analyses.saliency.token_removal_hits`). "negative" (keep the highest
    first): higher is better; "positive": lower is better."""
    from analyses import saliency

    target = _targets(model, images, target)
    scores, _ = feature_scores(model, images, maps, "patch")
    hits = saliency.token_removal_hits(model, images, target, scores, order=order, batch_size=batch_size)
    return torch.tensor([saliency.auc(curve) for curve in hits.T.double()])


_BENCHMARK = ("BASELINE_METHODS", "CURVE_METRICS", "LOCALISATION_METRICS", "METRICS", "DEFAULT_METRICS",
              "ROAD_PERCENTAGES", "MASK_SIZES", "Scores", "evaluate", "summarise", "plot", "cli")


def __getattr__(name):
    """The benchmark over a store (:mod:`analyses.benchmark`), re-exported here where it started; imported on
    first use because it imports this module."""
    if name in _BENCHMARK:
        from analyses import benchmark

        return getattr(benchmark, name)
    raise AttributeError(f"module 'analyses.faithfulness' has no attribute {name!r}")
