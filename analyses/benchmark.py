"""The faithfulness and localisation benchmark over a store of explanation maps (``vitlens evaluate``).

:func:`evaluate` scores every ``map.<method>`` of a store (from :func:`analyses.explain.run`) beside three
baselines (a random map, a centre prior and the true mask as the oracle) with the curve metrics of
:mod:`analyses.faithfulness` and the mask metrics of :mod:`analyses.localisation`, one recorder
:class:`~vitlens.recorder.Computation` per method so that scoring is resumable per batch and splits over
``torchrun`` ranks like any recording; :func:`summarise` gives means with bootstrap 95% intervals by class and
by mask size, and :func:`plot` the method x metric table and the curves. This module holds the bookkeeping; the
metrics themselves are functions over tensors in those two modules (and re-exported from
:mod:`analyses.faithfulness`, where the benchmark started).
"""
from __future__ import annotations

from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from analyses import localisation
from analyses.faithfulness import aopc, deletion_insertion, positive_negative, road, token_removal_auc
from vitlens.recorder import Computation
from vitlens.store import METADATA_FILE

BASELINE_METHODS = ("random", "centre", "oracle")
"""Chance (uniform noise, seeded by the sample index), the centre prior and the true mask (for the patch-level
localisation scores, the patch mask: :func:`analyses.localisation.oracle_maps`), scored beside every method."""
CURVE_METRICS = ("deletion", "insertion", "aopc", "road_morf", "road_lerf", "positive", "negative", "token_removal")
"""Faithfulness: curve AUCs per image. ``token_removal`` is :func:`analyses.faithfulness.token_removal_auc` (keep
the top n patch tokens, accuracy; the mean over images is the set's plain AUC, higher is better)."""
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
    float32 [values], plus the mask's object fraction), so that evaluation resumes and splits over ranks.

    The maps store is opened on the first batch and kept open for the rest; :meth:`close` (which
    :func:`evaluate` calls when the recording ends) closes it."""

    dtype = "float32"
    needs_grad = False

    def __init__(self, method: str, metrics: tuple[str, ...], maps_path: str, dataset, steps: int = 20,
                 baseline: str = "zero"):
        self.method, self.metrics, self.maps_path, self.steps, self.baseline = method, tuple(metrics), str(maps_path), \
            steps, baseline
        self.name = f"scores.{method}"
        self._dataset = dataset
        self._maps_store = None  # the ActivationStore at maps_path, opened by the first maps() call

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
        if self._maps_store is None:
            from vitlens.store import ActivationStore

            self._maps_store = ActivationStore(self.maps_path)
        rows = indices.cpu().numpy()
        return torch.from_numpy(self._maps_store[f"map.{self.method}"][rows.min():rows.max() + 1][rows - rows.min()])

    def close(self) -> None:
        """Close the maps store if :meth:`maps` opened it (a later batch opens it again)."""
        if self._maps_store is not None:
            self._maps_store.close()
            self._maps_store = None

    def compute(self, model, images: torch.Tensor, labels: torch.Tensor, batch: dict) -> torch.Tensor:
        indices = torch.as_tensor(batch["index"])
        masks = localisation.pixel_masks(self._dataset, indices.tolist()).to(images.device)
        maps = self.maps(model, images, indices, masks).to(images.device).float()
        grid = tuple(model.layout_for(images).grid)
        # the oracle at the patch level is the patch mask itself (the best possible patch map)
        at_level = {"pixel": maps, "patch": localisation.oracle_maps(masks, grid=grid) if self.method == "oracle"
                    else maps}
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
            elif metric == "token_removal":
                columns.append(token_removal_auc(model, images, maps, labels))
            elif metric in ("positive", "negative"):
                if "pn" not in cached:
                    cached["pn"] = positive_negative(model, images, maps, labels)
                columns.append(cached["pn"][metric].auc)
            elif metric in ("pixel_accuracy", "miou", "map"):
                key = f"seg.{level}"
                if key not in cached:
                    cached[key] = localisation.segmentation_scores(at_level[level], masks, level=level, grid=grid)
                columns.append(getattr(cached[key], metric))
            elif metric == "top_k_intersection":
                columns.append(localisation.top_k_intersection(at_level[level], masks, k=0.2, level=level, grid=grid))
            else:
                columns.append(getattr(localisation, metric)(at_level[level], masks, level=level, grid=grid))
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

    Each method's scores are recorded by the recorder into ``<store>/results/evaluate/<method>`` in shards of
    one batch (`batch_size` images), so an interrupted evaluation loses at most one batch per method and the next
    run scores only the rest (a store made with another batch size keeps its shards); under ``torchrun`` each
    rank scores its own shards. Returns the tidy per-image DataFrame (sample_id,
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
        out_path = path / "results" / "evaluate" / method
        shard_size = None if (out_path / METADATA_FILE).exists() else batch_size  # an existing store keeps its own
        with closing(Scores(method, metrics, path, data, steps, baseline)) as scores:  # the maps store, opened once
            out = vitlens.record(model, data, out_path, computations=[scores], dtype="float32",
                                 batch_size=batch_size, shard_size=shard_size, device=device, progress=progress)
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


def plot(store_or_table, *, kind: str = "table"):
    """A plotly Figure of an evaluation.

    kind="table": the method x metric heatmap of the means with their bootstrap 95% intervals, from a store path
    (its ``results/evaluate.csv``) or the per-image table; kind="curves": the deletion and insertion curves of a
    store path (its per-method score stores), the mean over images with a normal 95% band (mean ± 1.96 SE).
    """
    import pandas as pd
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    if kind not in ("table", "curves"):
        raise ValueError(f"kind={kind!r}: use 'table' (method x metric) or 'curves' (deletion and insertion)")
    store = None if isinstance(store_or_table, pd.DataFrame) else Path(store_or_table)
    table = pd.read_csv(store / "results" / "evaluate.csv") if store is not None else store_or_table
    if kind == "table":
        summary = summarise(table, by=("all",), n_resamples=200)
        summary["column"] = summary["metric"] + " (" + summary["level"] + ")"
        means = summary.pivot(index="method", columns="column", values="mean")
        text = summary.assign(t=summary.apply(lambda r: f"{r['mean']:.3f}<br>[{r.ci_low:.3f}, {r.ci_high:.3f}]",
                                              axis=1)).pivot(index="method", columns="column", values="t")
        figure = go.Figure(go.Heatmap(z=means.values, x=list(means.columns), y=list(means.index), text=text.values,
                                      texttemplate="%{text}", colorscale="Viridis"))
        return figure.update_layout(title="method x metric: mean [bootstrap 95% interval]")
    if store is None:
        raise ValueError("kind='curves' reads the per-method score stores: pass the store path, not a table")
    from vitlens.store import ActivationStore

    figure = make_subplots(1, 2, subplot_titles=("deletion", "insertion"))
    palette = qualitative.Plotly + qualitative.D3
    for i, method in enumerate(sorted(table["method"].unique())):
        with ActivationStore(store / "results" / "evaluate" / method) as scores:
            values = scores[f"scores.{method}"][:]
            n_steps = scores.meta["outputs"][f"scores.{method}"]["computation"]["steps"] + 1
        colour = palette[i % len(palette)]
        for col, part in enumerate((values[:, -2 * n_steps:-n_steps], values[:, -n_steps:])):
            if np.isnan(part).all():
                continue
            x = np.linspace(0, 1, part.shape[1])
            mean, se = np.nanmean(part, 0), np.nanstd(part, 0) / np.sqrt(len(part))
            figure.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[mean + 1.96 * se, (mean - 1.96 * se)[::-1]],
                                        fill="toself", line={"width": 0}, fillcolor=colour, opacity=0.2,
                                        showlegend=False, hoverinfo="skip"), 1, col + 1)
            figure.add_trace(go.Scatter(x=x, y=mean, name=method, line={"color": colour}, showlegend=col == 0),
                             1, col + 1)
    figure.update_xaxes(title="fraction of patches removed / inserted")
    return figure.update_yaxes(title="target probability")


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
