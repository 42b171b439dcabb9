"""Class identifiability and the other measures of vit-cls_emb (§A5-A8) over a store of projections.

:func:`analyses.class_embedding.run` records, for every image, layer and token, the label's rank, logit and
top-5 classes of the residual and of each sub-layer's output; the functions here read such a store chunk by
chunk and return tidy DataFrames: identifiability per layer and token set, the comparison with a random twin,
change rates, class-similarity change, residual composition and class vs context tokens, and :func:`plot`
draws any of them. They are separate from the recording so that a store made elsewhere (another machine, the
command line) is analysed without the model. Each is re-exported from :mod:`analyses.class_embedding`.

Where vit-cls_emb has a bug that changes a number (§A12), the default is correct and ``compat=True``
reproduces the original: the GAP model's first image token (dropped by the original's ``[:, 1:]``), the mixed
token sets, and residual composition's ``comp`` (which tests the attention match twice and never the MLP's).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

RECORD_HINT = ("record it with `vitlens analyze identifiability --model M --data D --store PATH` "
               "(analyses.class_embedding.run)")


def _open(store):
    from vitlens import ActivationStore

    return store if hasattr(store, "iter_chunks") else ActivationStore(store)


def _chunks(store, names: list[str], size: int = 1024):
    """Aligned chunks ``{name: array [<=size, ...]}`` of several outputs; a missing output names the command."""
    for name in names:
        if name not in store:
            raise KeyError(f"{store.path} has no {name!r} output; {RECORD_HINT}")
    iterators = [store.iter_chunks(name, size) for name in names]
    for parts in zip(*iterators):
        yield {name: array for name, (_, array) in zip(names, parts)}


def _n_classes(store) -> int:
    return int(store.meta["model"]["cfg"]["d_vocab"])


def token_sets(store, *, compat: bool = False) -> dict[str, np.ndarray]:
    """``{"cls": [cls index], "image": patch indices}`` of a store's layout ("cls" only with a class token).

    ``compat=True`` takes the image tokens as every column but the first, as vit-cls_emb's ``[:, 1:]``
    does; for a model without a class token (the GAP model) that drops a real image token (§A12.3).
    """
    layout = store.layout
    sets = {} if layout.cls_index is None else {"cls": np.array([layout.cls_index])}
    sets["image"] = np.arange(1, layout.n_tokens) if compat else layout.tokens("patches").numpy()
    return sets


def identifiability(store, *, compat: bool = False, blocks: int | None = None) -> pd.DataFrame:
    """Class identifiability per layer and token set (§A5), from ``class_rank``.

    One row per (layer, tokens), tokens "cls" or "image", columns ``layer, tokens, rate, images_with_one,
    mean_identifiability``: rate = % of the tokens with rank 0, averaged over images; images_with_one = %
    of images with at least one such token; mean_identifiability = the mean of r = 1 - rank/C. For the last
    layer's CLS token of a CLS-pooling model the rate is the top-1 accuracy. `blocks` averages consecutive
    layers into that many "normalised blocks" (``blocks=12`` for ViT-L's 24, as the study plots it).
    `compat`: image tokens as in :func:`token_sets`.
    """
    store = _open(store)
    sets, n_classes = token_sets(store, compat=compat), _n_classes(store)
    sums = {kind: np.zeros((3, store.meta["model"]["cfg"]["n_layers"])) for kind in sets}
    for chunk in _chunks(store, ["class_rank"]):
        ranks = chunk["class_rank"].astype(np.int64)  # [n layers tokens]
        for kind, tokens in sets.items():
            selected = ranks[:, :, tokens]
            top = selected == 0
            sums[kind] += [top.mean(-1).sum(0), top.any(-1).sum(0), (1 - selected / n_classes).mean(-1).sum(0)]
    rows = []
    for kind, (rate, one, mean) in sums.items():
        for layer in range(len(rate)):
            rows.append({"layer": layer, "tokens": kind, "rate": 100 * rate[layer] / len(store),
                         "images_with_one": 100 * one[layer] / len(store),
                         "mean_identifiability": mean[layer] / len(store)})
    table = pd.DataFrame(rows)
    return table if blocks is None else _normalise_blocks(table, blocks)


def _normalise_blocks(table: pd.DataFrame, blocks: int) -> pd.DataFrame:
    """Average consecutive layers into `blocks` groups (ViT-L's 24 layers -> 12 normalised blocks)."""
    n_layers = table["layer"].max() + 1
    if blocks < 1 or n_layers % blocks:
        raise ValueError(f"blocks={blocks} must divide the {n_layers} layers into equal groups")
    table = table.assign(layer=table["layer"] // (n_layers // blocks))
    return table.groupby(["layer", "tokens"], sort=False, as_index=False).mean()


def _identifiability_values(store, tokens: np.ndarray) -> np.ndarray:
    """r = 1 - rank/C, float64 [n layers len(tokens)]."""
    ranks = np.concatenate([c["class_rank"][:, :, tokens] for c in _chunks(store, ["class_rank"])])
    return 1 - ranks / _n_classes(store)


def compare_to_random(store, random_store, *, compat: bool = False) -> pd.DataFrame:
    """Per layer and token set: is r above that of the random twin? One-sided Wilcoxon signed-rank test of the
    paired, flattened r (images x tokens) against ``random_store`` (same images, e.g. ``class_embedding.run(...,
    random_twin=True)``), as the study's identifiability plot does. Columns ``layer, tokens, mean,
    random_mean, statistic, p_value``."""
    from scipy.stats import wilcoxon

    store, random_store = _open(store), _open(random_store)
    if store.meta["samples"] != random_store.meta["samples"] or store.layout != random_store.layout:
        raise ValueError(f"{random_store.path} does not hold the samples and token layout of {store.path}; "
                         "record the twin with analyses.class_embedding.run(..., random_twin=True)")
    rows = []
    for kind, tokens in token_sets(store, compat=compat).items():
        r, r_random = _identifiability_values(store, tokens), _identifiability_values(random_store, tokens)
        for layer in range(r.shape[1]):
            x, y = r[:, layer].ravel(), r_random[:, layer].ravel()
            statistic, p_value = wilcoxon(x, y, alternative="greater") if (x != y).any() else (np.nan, 1.0)
            rows.append({"layer": layer, "tokens": kind, "mean": x.mean(), "random_mean": y.mean(),
                         "statistic": float(statistic), "p_value": float(p_value)})
    return pd.DataFrame(rows)


def change_rate(store, *, compat: bool = False) -> pd.DataFrame:
    """How often a block raises the label's logit (§A5 "change rate"): for layers l >= 1, the % of (image,
    image token) pairs where ``class_logit[l] > class_logit[l - 1]``. Columns ``layer, rate``.
    `compat`: image tokens as in :func:`token_sets`."""
    store = _open(store)
    tokens = token_sets(store, compat=compat)["image"]
    up = count = 0
    for chunk in _chunks(store, ["class_logit"]):
        logit = chunk["class_logit"][:, :, tokens]
        up = up + (logit[:, 1:] > logit[:, :-1]).sum((0, 2))
        count += logit.shape[0] * logit.shape[2]
    return pd.DataFrame({"layer": np.arange(1, len(up) + 1), "rate": 100 * up / count})


def class_similarity_change(store, *, compat: bool = False) -> pd.DataFrame:
    """How often a sub-layer's output alone scores the label higher than the residual it reads (§A5): for layers
    l >= 1, the % of tokens with ``class_logit_{attn|mlp}[l] - class_logit[l - 1] > 0``, per token set. As in
    the study, the MLP is compared with the residual before the block too (not the post-attention stream).
    Columns ``layer, sublayer, tokens, rate``."""
    store = _open(store)
    sets = token_sets(store, compat=compat)
    counts = {}
    for chunk in _chunks(store, ["class_logit", "class_logit_attn", "class_logit_mlp"]):
        previous = chunk["class_logit"][:, :-1]
        for sublayer in ("attn", "mlp"):
            diff = chunk[f"class_logit_{sublayer}"][:, 1:] - previous  # [n layers-1 tokens]
            for kind, tokens in sets.items():
                up, n = counts.get((sublayer, kind), (0, 0))
                counts[sublayer, kind] = up + (diff[:, :, tokens] > 0).sum((0, 2)), n + len(diff) * len(tokens)
    return pd.DataFrame([{"layer": layer + 1, "sublayer": sublayer, "tokens": kind, "rate": 100 * up[layer] / n}
                         for (sublayer, kind), (up, n) in counts.items() for layer in range(len(up))])


def residual_composition(store, *, tokens: str = "all", compat: bool = False) -> pd.DataFrame:
    """Which part of a block its top-1 class comes from (§A5 "residual match"): for layers l >= 1, the % of
    tokens whose top-1 class of the residual ``class_top5[l]`` equals that of the attention output ('attn'),
    of the MLP output ('mlp') and of the previous residual ('prev'); 'comp' is the % matching none of them
    (a class composed by the sum). `tokens`: "all", "cls" or "image".

    ``compat=True`` reproduces the study's 'comp', which tests the attention match twice and never the MLP
    (§A12.2), so it also counts the tokens whose top-1 comes from the MLP alone; its "image" tokens are as
    in :func:`token_sets`. Columns ``layer, attn, mlp, prev, comp``.
    """
    store = _open(store)
    sets = {"all": np.arange(store.layout.n_tokens), **token_sets(store, compat=compat)}
    if tokens not in sets:
        raise ValueError(f"tokens={tokens!r} must be one of {sorted(sets)} for this store")
    index = sets[tokens]
    totals, count = np.zeros((4, store.meta["model"]["cfg"]["n_layers"] - 1)), 0
    for chunk in _chunks(store, ["class_top5", "class_top5_attn", "class_top5_mlp"]):
        top1 = {name: chunk[name][:, :, index, 0] for name in chunk}
        resid = top1["class_top5"][:, 1:]
        attn, mlp = resid == top1["class_top5_attn"][:, 1:], resid == top1["class_top5_mlp"][:, 1:]
        prev = resid == top1["class_top5"][:, :-1]
        comp = ~(attn | prev) if compat else ~(attn | mlp | prev)
        totals += np.stack([m.sum((0, 2)) for m in (attn, mlp, prev, comp)])
        count += resid.shape[0] * resid.shape[2]
    table = pd.DataFrame(100 * totals.T / count, columns=["attn", "mlp", "prev", "comp"])
    return table.assign(layer=np.arange(1, len(table) + 1))[["layer", "attn", "mlp", "prev", "comp"]]


CONTEXT_MEASURES = ("identifiability", "attn", "mlp")


def object_masks(data, *, threshold: float = 0.0) -> np.ndarray:
    """bool [n patches]: the object tokens of each item (``token_mask > threshold``, flattened row-major).

    With ``mask_resize="area"`` the masks hold object fractions, and ``> 0`` calls a patch with any object
    pixel an object token; nearest masks are 0/1."""
    masks = []
    for i in range(len(data)):
        item = data[i]
        if "token_mask" not in item:
            raise ValueError("the dataset has no token masks (item['token_mask']); context perturbation and "
                             "class vs context tokens need segmentation masks: use ImageNet-S or the scenes")
        masks.append(np.asarray(item["token_mask"]).reshape(-1) > threshold)
    return np.stack(masks)


def context_difference(store, data, *, measure: str = "identifiability", n_permutations: int = 300,
                       seed: int = 0, compat: bool = False, threshold: float = 0.0) -> pd.DataFrame:
    """Class (object) vs context image tokens, per layer (§A5 ``compute_context_diff``, §A11).

    measure "identifiability": r = 1 - rank/C of each image token at every layer; "attn" or "mlp": the change
    of the label's logit that the sub-layer alone brings, ``class_logit_{attn|mlp}[l] - class_logit[l - 1]``
    for layers l >= 1. The statistic is mean(object tokens) - mean(context tokens) over all images; the
    p-value is the fraction of `n_permutations` shuffles of the object/context labels (over all image
    tokens, seeded) whose difference is larger. Masks come from `data` (``token_mask > threshold``), in the
    store's sample order. Columns ``layer, difference, p_value``.
    """
    store = _open(store)
    if measure not in CONTEXT_MEASURES:
        raise ValueError(f"measure={measure!r} must be one of {CONTEXT_MEASURES}")
    samples = getattr(data, "samples", None)
    if samples is None or [str(s) for s in samples["sample_id"]] != store.meta["samples"]["sample_id"]:
        raise ValueError(f"the dataset's samples are not those of {store.path}; pass the dataset it was "
                         "recorded from")
    layout = store.layout
    is_object = object_masks(data, threshold=threshold)  # [n patches]
    tokens = token_sets(store, compat=compat)["image"]
    is_object = is_object[:, tokens - layout.n_prefix]
    if measure == "identifiability":
        values, first = _identifiability_values(store, tokens), 0
    else:
        names = ["class_logit", f"class_logit_{measure}"]
        parts = [(c[names[1]][:, 1:] - c[names[0]][:, :-1])[:, :, tokens] for c in _chunks(store, names)]
        values, first = np.concatenate(parts), 1
    values = values.transpose(0, 2, 1).reshape(-1, values.shape[1])  # [(image token) layers]
    labels = is_object.reshape(-1)
    n_object = int(labels.sum())
    if not 0 < n_object < len(labels):
        raise ValueError("the masks put every image token on one side (object or context); nothing to compare")
    observed = _mean_difference(values, labels, n_object)
    rng = np.random.default_rng(seed)
    larger = np.zeros(values.shape[1])
    for _ in range(n_permutations):
        larger += _mean_difference(values, rng.permutation(labels), n_object) > observed
    return pd.DataFrame({"layer": np.arange(first, first + values.shape[1]), "difference": observed,
                         "p_value": larger / max(n_permutations, 1)})


def _mean_difference(values: np.ndarray, labels: np.ndarray, n_object: int) -> np.ndarray:
    """mean(values[labels]) - mean(values[~labels]) per column of [tokens layers]."""
    total, object_sum = values.sum(0), values[labels].sum(0)
    return object_sum / n_object - (total - object_sum) / (len(labels) - n_object)


# ---------------------------------------------------------------------------------------------------------
# Plots


def plot(table: pd.DataFrame, *, baseline: pd.DataFrame | None = None, y: str | None = None, title: str = ""):
    """A plotly Figure of any measure's table (recognised by its columns).

    identifiability: `y` (default mean_identifiability) per layer and token set, `baseline` (the random
    twin's table) dashed, chance (0.5) dotted; compare_to_random: mean vs random mean; change_rate,
    class_similarity_change: rates per layer; residual_composition: the four shares as bars;
    context_difference: the difference per layer, p-values on hover.
    """
    import plotly.express as px
    import plotly.graph_objects as go

    columns = set(table.columns)
    if {"mean_identifiability", "tokens"} <= columns:
        y = y or "mean_identifiability"
        figure = px.line(table, x="layer", y=y, color="tokens", markers=True)
        if baseline is not None:
            for kind, part in baseline.groupby("tokens", sort=False):
                figure.add_scatter(x=part["layer"], y=part[y], mode="lines", name=f"{kind} (random)",
                                   line={"dash": "dash"})
        if y == "mean_identifiability":
            figure.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    elif {"random_mean", "p_value"} <= columns:
        long = table.melt(id_vars=["layer", "tokens", "p_value"], value_vars=["mean", "random_mean"],
                          var_name="model", value_name="mean identifiability")
        figure = px.line(long, x="layer", y="mean identifiability", color="tokens", line_dash="model",
                         markers=True, hover_data=["p_value"])
    elif {"attn", "mlp", "prev", "comp"} <= columns:
        long = table.melt(id_vars="layer", var_name="source", value_name="% of tokens")
        figure = px.bar(long, x="layer", y="% of tokens", color="source", barmode="group")
    elif {"difference", "p_value"} <= columns:
        figure = px.bar(table, x="layer", y="difference", hover_data=["p_value"])
    elif {"sublayer", "rate"} <= columns:
        figure = px.line(table, x="layer", y="rate", color="sublayer", line_dash="tokens", markers=True)
    elif {"layer", "rate"} <= columns:
        figure = go.Figure(go.Scatter(x=table["layer"], y=table["rate"], mode="lines+markers"))
        figure.update_layout(xaxis_title="layer", yaxis_title="% of image tokens whose label logit rises")
    else:
        raise ValueError(f"no plot for a table with columns {sorted(columns)}; pass the DataFrame of one of "
                         "this module's measures")
    figure.update_layout(title=title or None, template="plotly_white")
    return figure
