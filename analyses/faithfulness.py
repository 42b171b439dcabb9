"""Faithfulness metrics: does the model's output fall when the features a map ranks highest are removed?

Deletion and insertion curves (Petsiuk et al. 2018), region perturbation / AOPC (Samek et al. 2017), ROAD with
noisy linear imputation (Rong et al. 2022) and Chefer et al.'s positive/negative perturbation, all over maps
``[batch, h, w]`` on the model's token grid or at the image resolution. Every curve is computed in large batches:
the perturbed images of all steps of all images are built chunk by chunk on the device and go through the model
together, never one Python forward per step. Features are patches of the token grid (``level="patch"``) or pixels
(``level="pixel"``, the map upsampled bilinearly); removed features take a baseline (zero, black, the image mean,
a blur, or DiffMask's uniform noise in [-1, 1]). The score is the target's softmax probability by default
(``output=``: "probability", "logit", "cross_entropy" (= -log p, DiffMask's "KLD") or "accuracy"), and the AUC is
the trapezoid rule over the removed fraction in [0, 1] (``compat=True``: ``np.trapz`` with unit spacing, as the
DiffMask notebook and Quantus compute it). Definitions follow ecosystem spec §4.4.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from analyses import localisation
from vitlens.recorder import Computation

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


def _setup(model, images, maps, target, level, order, seed):
    target = torch.as_tensor(target, device=images.device).long().expand(len(images))
    scores, grid = feature_scores(model, images, maps, level)
    return scores, grid, feature_positions(scores, order, seed=seed), target


def _baseline_fill(images: torch.Tensor, base: torch.Tensor) -> Fill:
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
    scores, grid, positions, target = _setup(model, images, maps, target, level, order, seed)
    base = baseline_images(images, baseline, data_config=getattr(model, "data_config", None), seed=seed)
    counts = _counts(scores.shape[-1], steps, images.device)
    deleted, inserted = _run_curves(model, images, positions, grid, target, [(counts, False), (counts, True)],
                                    _baseline_fill(images, base), output, batch_size)
    return {"deletion": Curves(deleted, auc(deleted, compat=compat)),
            "insertion": Curves(inserted, auc(inserted, compat=compat))}


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
    return _one(model, images, maps, target, False, steps, baseline, level, order, output, compat, batch_size, seed)


def insertion(model, images: torch.Tensor, maps: torch.Tensor, target, *, steps: int = 20,
              baseline: str | float | torch.Tensor = "zero", level: str = "patch", order: str = "morf",
              output: str = "probability", compat: bool = False, batch_size: int = 64, seed: int = 123) -> Curves:
    """Insertion curve and AUC (higher is better for MoRF): start from the `baseline` image and put back the
    first round(k N / steps) features in map order at step k. Same arguments and returns as :func:`deletion`;
    step 0 is the baseline image and the last step the unperturbed one. Quantus has no insertion metric."""
    return _one(model, images, maps, target, True, steps, baseline, level, order, output, compat, batch_size, seed)


def _one(model, images, maps, target, insert, steps, baseline, level, order, output, compat, batch_size, seed):
    scores, grid, positions, target = _setup(model, images, maps, target, level, order, seed)
    base = baseline_images(images, baseline, data_config=getattr(model, "data_config", None), seed=seed)
    counts = _counts(scores.shape[-1], steps, images.device)
    (curves,) = _run_curves(model, images, positions, grid, target, [(counts, insert)],
                            _baseline_fill(images, base), output, batch_size)
    return Curves(curves, auc(curves, compat=compat))


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
                            _baseline_fill(images, base), output, batch_size)
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
    out = {}
    for name, order in (("positive", "morf"), ("negative", "lerf")):
        scores, grid, positions, tgt = _setup(model, images, maps, target, "pixel", order, 0)
        counts = _counts(scores.shape[-1], steps, images.device)[:-1]
        base = baseline_images(images, "black", data_config=model.data_config)
        (curves,) = _run_curves(model, images, positions, grid, tgt, [(counts, False)],
                                _baseline_fill(images, base), output, batch_size)
        out[name] = Curves(curves, auc(curves, torch.arange(steps) / steps))
    return out



def token_removal(model, images: torch.Tensor, maps: torch.Tensor, target, *, order: str = "negative",
                  compat: bool = False, batch_size: int = 256) -> tuple[torch.Tensor, float]:
    """vit-cls_emb's keep-top-n token-removal curve (§A9) for token-grid maps, by dropping tokens, from
    :func:`analyses.saliency.token_removal_curve`: accuracy over the batch [patches - 1] for n = 1..N-1 kept
    patches ("negative": the highest-scored kept; "positive": the lowest). AUC: the mean accuracy over the kept
    fraction (:func:`analyses.saliency.auc`), or with ``compat=True`` the study's Σacc / (max(acc) · N)."""
    from analyses import saliency

    target = torch.as_tensor(target, device=images.device).long().expand(len(images))
    curve = saliency.token_removal_curve(model, images, target, maps, order=order, batch_size=batch_size)
    return curve, (saliency.auc_study(curve) if compat else saliency.auc(curve))


# ---- the benchmark over a store of maps ------------------------------------------------------------------------

BASELINE_METHODS = ("random", "centre", "oracle")
"""Chance (uniform noise, seeded by the sample index), the centre prior and the true mask, scored beside every
method."""
CURVE_METRICS = ("deletion", "insertion", "aopc", "road_morf", "road_lerf", "positive", "negative")
LOCALISATION_METRICS = ("pointing_game", "relevance_mass", "relevance_rank", "attribution_localisation",
                        "top_k_intersection", "roc_auc", "pixel_accuracy", "miou", "map")
METRICS = CURVE_METRICS + LOCALISATION_METRICS
DEFAULT_METRICS = ("deletion", "insertion", "aopc", "road_morf", "pointing_game", "relevance_mass",
                   "relevance_rank", "pixel_accuracy", "miou", "map")
"""Ecosystem spec §4.4's recommended set: metrics 1, 2, 3, 5, 11, 12, 13 and 17."""
ROAD_PERCENTAGES = tuple(range(10, 100, 10))
"""ROAD's removal percentages in :func:`evaluate` (pytorch-grad-cam's; Quantus's 1, 3, ..., 99 cost 5x more
sparse solves)."""
MASK_SIZES = {"small": (0.0, 0.1), "medium": (0.1, 0.3), "large": (0.3, 1.0)}
"""Object fraction of the valid pixels: small up to 10%, medium up to 30%, large above."""


def _values(metrics: tuple[str, ...]) -> list[tuple[str, str]]:
    """(metric, level) of each stored score: faithfulness at its own level, localisation at pixel and patch."""
    out = []
    for metric in metrics:
        if metric in LOCALISATION_METRICS:
            out += [(metric, "pixel"), (metric, "patch")]
        else:
            out.append((metric, "pixel" if metric.startswith(("road", "positive", "negative")) else "patch"))
    return out


class Scores(Computation):
    """The scores of one method (or baseline) per image, as a recorder ``Computation`` (``scores.<method>``:
    float32 [values], plus the mask's object fraction), so that evaluation resumes and splits over ranks."""

    dtype = "float32"
    needs_grad = False

    def __init__(self, method: str, metrics: tuple[str, ...], maps_path: str, dataset, steps: int = 20,
                 baseline: str = "zero"):
        self.method, self.metrics, self.maps_path, self.steps, self.baseline = method, tuple(metrics), str(maps_path), \
            steps, baseline
        self.name = f"scores.{method}"
        self._dataset = dataset

    def to_dict(self) -> dict:
        return {"class": "Scores", "method": self.method, "metrics": list(self.metrics), "steps": self.steps,
                "baseline": self.baseline}

    @property
    def wants_batch(self) -> bool:
        return True

    def shape(self, model) -> tuple[int, ...]:
        return (len(_values(self.metrics)) + 1 + 2 * (self.steps + 1),)

    def maps(self, model, images: torch.Tensor, indices: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        grid = tuple(model.layout_for(images).grid)
        if self.method == "random":
            return torch.stack([torch.rand(grid, generator=torch.Generator().manual_seed(int(i))) for i in indices])
        if self.method == "centre":
            return localisation.centre_prior((len(images), *grid))
        if self.method == "oracle":
            return localisation.oracle_maps(masks)
        from vitlens.store import ActivationStore

        with ActivationStore(self.maps_path) as store:
            rows = indices.cpu().numpy()
            return torch.from_numpy(store[f"map.{self.method}"][rows.min():rows.max() + 1][rows - rows.min()])

    def compute(self, model, images: torch.Tensor, labels: torch.Tensor, batch: dict) -> torch.Tensor:
        indices = torch.as_tensor(batch["index"])
        masks = localisation.pixel_masks(self._dataset, indices.tolist()).to(images.device)
        maps = self.maps(model, images, indices, masks).to(images.device).float()
        grid = tuple(model.layout_for(images).grid)
        columns, curves = [], [torch.full((len(images), self.steps + 1), float("nan"), device=images.device)] * 2
        cached: dict[str, object] = {}
        for metric, level in _values(self.metrics):
            if metric in ("deletion", "insertion"):
                if "di" not in cached:
                    cached["di"] = deletion_insertion(model, images, maps, labels, steps=self.steps,
                                                      baseline=self.baseline)
                    curves = [cached["di"]["deletion"].curves, cached["di"]["insertion"].curves]
                columns.append(cached["di"][metric].auc)
            elif metric == "aopc":
                columns.append(aopc(model, images, maps, labels).auc)
            elif metric.startswith("road"):
                columns.append(road(model, images, maps, labels, order=metric[5:], percentages=ROAD_PERCENTAGES).auc)
            elif metric in ("positive", "negative"):
                if "pn" not in cached:
                    cached["pn"] = positive_negative(model, images, maps, labels)
                columns.append(cached["pn"][metric].auc)
            elif metric in ("pixel_accuracy", "miou", "map"):
                key = f"seg.{level}"
                if key not in cached:
                    cached[key] = localisation.segmentation_scores(maps, masks, level=level, grid=grid)
                columns.append(getattr(cached[key], metric))
            elif metric == "top_k_intersection":
                columns.append(localisation.top_k_intersection(maps, masks, k=0.2, level=level, grid=grid))
            else:
                columns.append(getattr(localisation, metric)(maps, masks, level=level, grid=grid))
        valid = ~masks.isnan()
        fraction = ((masks == 1) & valid).flatten(1).sum(-1) / valid.flatten(1).sum(-1)
        return torch.cat([torch.stack([c.float() for c in columns] + [fraction.float()], -1), *curves], -1)


def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = tuple(DEFAULT_METRICS if metrics is None else ([metrics] if isinstance(metrics, str) else metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown}; --metrics takes a comma-separated subset of {list(METRICS)}")
    return metrics


def evaluate(store, data, *, methods=None, metrics=None, model=None, steps: int = 20, baseline: str = "zero",
             batch_size: int = 16, device=None, progress: bool = True):
    """Score every explanation map of a store, beside the random, centre and oracle baselines.

    store: a store path holding ``map.<method>`` outputs over `data` (:func:`analyses.explain.run`); data: the
    same dataset, with segmentation masks (ImageNet-S or the bundled scenes); methods: names (default every map
    in the store); metrics: names from :data:`METRICS` (default :data:`DEFAULT_METRICS`); model: default
    ``vitlens.load_model(store's model tag)``, checked against the store's weights.

    Each method's scores are recorded by the recorder into ``<store>/results/evaluate/<method>`` (resumable per
    shard; under ``torchrun`` each rank scores its own images). Returns the tidy per-image DataFrame (sample_id,
    index, label, class, method, metric, level, value, mask_fraction, mask_size), also written to
    ``<store>/results/evaluate.csv``; :func:`summarise` aggregates it (written to ``evaluate_summary.csv``).
    """
    import pandas as pd

    import vitlens
    from vitlens.store import ActivationStore

    metrics = _check_metrics(metrics)
    path = Path(store)
    with ActivationStore(path) as maps_store:
        available = sorted(k[4:] for k in maps_store.keys() if k.startswith("map."))
        tag, stored_ids = maps_store.tag, list(maps_store.samples["sample_id"].astype(str))
        if not maps_store.done.all():
            raise ValueError(f"{path} holds maps for {int(maps_store.done.sum())} of {len(maps_store)} samples; "
                             "finish `vitlens explain` first")
    if not available:
        raise ValueError(f"{path} holds no explanation maps (map.<method> outputs); run `vitlens explain` first")
    methods = available if methods is None else ([methods] if isinstance(methods, str) else list(methods))
    missing = [m for m in methods if m not in available and m not in BASELINE_METHODS]
    if missing:
        raise KeyError(f"method(s) {missing} have no maps in {path}; --methods takes {available} "
                       f"(and the baselines {list(BASELINE_METHODS)})")
    samples = getattr(data, "samples", None)
    if samples is None or "mask_path" not in samples.columns:
        raise ValueError("the dataset has no segmentation masks (no mask_path column); evaluate needs ImageNet-S "
                         "(validation split) or the bundled scenes")
    if list(samples["sample_id"].astype(str)) != stored_ids:
        raise ValueError(f"the dataset's samples differ from those of {path}; pass the dataset the maps were made on")
    model = vitlens.load_model(tag) if model is None else model
    frames = []
    for method in [m for m in methods if m not in BASELINE_METHODS] + list(BASELINE_METHODS):
        scores = Scores(method, metrics, path, data, steps, baseline)
        out = vitlens.record(model, data, path / "results" / "evaluate" / method, computations=[scores],
                             dtype="float32", batch_size=batch_size, device=device, progress=progress)
        with out:
            values = out[scores.name][:]
        frames.append(_tidy(values, method, metrics, samples))
    table = pd.concat(frames, ignore_index=True)
    results = path / "results"
    results.mkdir(exist_ok=True)
    table.to_csv(results / "evaluate.csv", index=False)
    summarise(table).to_csv(results / "evaluate_summary.csv", index=False)
    return table


def _tidy(values: np.ndarray, method: str, metrics: tuple[str, ...], samples):
    import pandas as pd

    names = _values(metrics)
    fraction = values[:, len(names)]
    size = pd.cut(fraction, [-0.001, 0.1, 0.3, 1.0], labels=list(MASK_SIZES))
    rows = []
    for j, (metric, level) in enumerate(names):
        rows.append(pd.DataFrame({"sample_id": samples["sample_id"].values, "index": np.arange(len(samples)),
                                  "label": samples["label"].values,
                                  "class": samples["class"].values if "class" in samples else samples["label"].values,
                                  "method": method, "metric": metric, "level": level, "value": values[:, j],
                                  "mask_fraction": fraction, "mask_size": size.astype(str)}))
    return pd.concat(rows, ignore_index=True)


def summarise(table, by: tuple[str, ...] = ("all", "class", "mask_size"), *, n_resamples: int = 1000, seed: int = 0):
    """Aggregate a per-image table: for each method, metric and level (and each class or mask size), the mean
    over images with a scored value, its percentile-bootstrap 95% interval (scipy.stats.bootstrap), the number of
    images and of NaN scores (empty masks). Columns: group, stratum, method, metric, level, mean, ci_low, ci_high,
    n, nan."""
    import pandas as pd
    from scipy.stats import bootstrap

    rows = []
    for group in by:
        keys = ["method", "metric", "level"] + ([] if group == "all" else [group])
        for key, part in table.groupby(keys, sort=False, observed=True):
            values = part["value"].to_numpy(dtype=np.float64)
            scored = values[~np.isnan(values)]
            low = high = np.nan
            if len(scored) > 1 and np.ptp(scored) > 0:
                ci = bootstrap((scored,), np.mean, n_resamples=n_resamples, method="percentile",
                               random_state=np.random.default_rng(seed), vectorized=True).confidence_interval
                low, high = ci.low, ci.high
            elif len(scored):
                low = high = scored.mean()
            rows.append({"group": group, "stratum": "all" if group == "all" else str(key[3]), "method": key[0],
                         "metric": key[1], "level": key[2], "mean": scored.mean() if len(scored) else np.nan,
                         "ci_low": low, "ci_high": high, "n": len(scored), "nan": int(np.isnan(values).sum())})
    return pd.DataFrame(rows)


def plot(store_or_table, *, curves_of: str | None = None):
    """Plotly figures of an evaluation: ``{"table": method x metric heatmap of the means with their 95%
    intervals, "curves": deletion and insertion curves, the mean over images with a bootstrap band}``.
    `store_or_table`: a store path (its ``results/evaluate.csv`` and per-method score stores) or a per-image table
    (then no curves)."""
    import pandas as pd
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    store = None if isinstance(store_or_table, pd.DataFrame) else Path(store_or_table)
    table = pd.read_csv(store / "results" / "evaluate.csv") if store is not None else store_or_table
    summary = summarise(table, by=("all",), n_resamples=200)
    summary["column"] = summary["metric"] + " (" + summary["level"] + ")"
    means = summary.pivot(index="method", columns="column", values="mean")
    text = summary.assign(t=summary.apply(lambda r: f"{r['mean']:.3f}<br>[{r.ci_low:.3f}, {r.ci_high:.3f}]", axis=1)
                          ).pivot(index="method", columns="column", values="t")
    table_fig = go.Figure(go.Heatmap(z=means.values, x=list(means.columns), y=list(means.index), text=text.values,
                                     texttemplate="%{text}", colorscale="Viridis"))
    table_fig.update_layout(title="method x metric: mean [bootstrap 95% interval]")
    figures = {"table": table_fig}
    if store is not None:
        from vitlens.store import ActivationStore

        curves_fig = make_subplots(1, 2, subplot_titles=("deletion", "insertion"))
        for i, method in enumerate(sorted(table["method"].unique())):
            with ActivationStore(store / "results" / "evaluate" / method) as scores:
                values = scores[f"scores.{method}"][:]
                n_steps = scores.meta["outputs"][f"scores.{method}"]["computation"]["steps"] + 1
            for col, part in enumerate((values[:, -2 * n_steps:-n_steps], values[:, -n_steps:])):
                if np.isnan(part).all():
                    continue
                x = np.linspace(0, 1, part.shape[1])
                mean, sd = np.nanmean(part, 0), np.nanstd(part, 0) / np.sqrt(len(part))
                colour = f"hsl({37 * i % 360},60%,45%)"
                curves_fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[mean + 1.96 * sd, (mean - 1.96 * sd)[::-1]],
                                                fill="toself", line={"width": 0}, fillcolor=colour, opacity=0.2,
                                                showlegend=False, hoverinfo="skip"), 1, col + 1)
                curves_fig.add_trace(go.Scatter(x=x, y=mean, name=method, line={"color": colour},
                                                showlegend=col == 0), 1, col + 1)
        curves_fig.update_xaxes(title="fraction of patches removed / inserted")
        curves_fig.update_yaxes(title="target probability")
        figures["curves"] = curves_fig
    return figures


def cli(args) -> None:
    """``vitlens evaluate STORE --data ... [--methods ...] [--metrics ...]``: print the method x metric table."""
    import pandas as pd

    import vitlens
    from vitlens.data import load_dataset
    from vitlens.store import ActivationStore

    with ActivationStore(args.store) as store:
        tag = store.tag
    model = vitlens.load_model(args.model or tag)
    data = load_dataset(args.data, args.split, model=model, n_per_class=args.n_per_class)
    split = (lambda text: None if text is None else [t.strip() for t in text.split(",") if t.strip()])
    table = evaluate(args.store, data, methods=split(args.methods), metrics=split(args.metrics), model=model,
                     steps=args.steps, baseline=args.baseline, batch_size=args.batch_size, device=args.device,
                     progress=not args.no_progress)
    summary = summarise(table, by=("all",))
    summary["score"] = summary.apply(lambda r: f"{r['mean']:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]", axis=1)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.pivot(index=["metric", "level"], columns="method", values="score"))
    print(f"written: {Path(args.store) / 'results' / 'evaluate.csv'} and evaluate_summary.csv")
