"""Class-embedding saliency (the study's ``ViTGradients``, §A9) and token-removal curves.

Each block's attention output, projected onto the class embeddings (``model.unembed(hook_attn_out)``), says
how much that block's attention writes the class at every token. Its gradient with respect to the block's
own attention probabilities (:func:`class_embedding_gradients`) scores every key a query reads; summed over
heads and blocks, the CLS query row gives each image token's importance (:func:`importance`, registered as
explanation method ``"class_embedding"``). One forward and one backward serve every block, token and image
of a batch (the original runs one backward per token and block, one image at a time): each block's
probabilities are leaves of the graph and each block's output is detached from the residual stream, so a
block's objective reaches only its own probabilities.

- default: the objective is the class logit of the projected output; importance = its gradient.
- ``compat=True``: the original's loss, ``CrossEntropyLoss(softmax(projection), one-hot)``, a double
  softmax (cross-entropy applied to probabilities); importance = minus its gradient.

Token-removal curves (:func:`token_removal_curve`; each image's own, :func:`token_removal_hits`) keep the
top-n patch tokens of any score map (dropped after the position embedding,
:func:`analyses.perturbation.forward_kept`) and measure accuracy per n, batched over images and n;
:func:`auc_study` is the study's AUC, :func:`auc` a plain one. Orderings: any map, the linear-probe ranks
(:func:`probe_scores`), random (:func:`random_curve`) and, on data with token masks, the true object tokens
(:func:`oracle_scores`). :func:`run` gives the study's perturbation-AUC table.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analyses.explain import register
from analyses.perturbation import forward_kept

ORDERS = ("negative", "positive")


def _require_cls(model, what: str) -> int:
    if model.layout.cls_index is None:
        raise ValueError(f"{what} reads the CLS query row, but {model.cfg.model_name} has no class token (average "
                         "pooling); use an explanation method without CLS, such as 'rollout' or 'chefer'")
    return model.layout.cls_index


def class_embedding_gradients(model, images: torch.Tensor, target: torch.Tensor, *, compat: bool = False,
                              tokens: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of each block's projected attention output w.r.t. its attention probabilities.

    Args:
        images: [batch C H W]; target: long [batch] classes.
        compat: the original's double-softmax cross-entropy loss (``grad_type='cross_entropy'``) instead of
            the class logit (its ``'cat_prob'``).
        tokens: the query tokens whose objective is differentiated (default all); other rows get zeros.
    Returns:
        ``(grads, patterns)``, both [batch layers heads query key]: ``grads[:, b, h, t, k]`` is the derivative
        of token t's objective at block b w.r.t. ``pattern[b, h, t, k]`` (row t's objective depends only on
        row t of its own block), ``patterns`` the attention probabilities.
    """
    if tokens is not None:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        n_tokens = model.layout_for(images).n_tokens
        if not len(tokens) or not 0 <= int(tokens.min()) <= int(tokens.max()) < n_tokens:
            raise ValueError(f"tokens {tokens.tolist()} must be a non-empty list of layout indices in [0, {n_tokens}) "
                             "(e.g. model.tokens('patches')), not negative ones")
    leaves, outputs = {}, {}

    def make_leaf(pattern, hook):
        leaves[hook.layer()] = pattern.detach().requires_grad_(True)
        return leaves[hook.layer()]

    def cut(attn_out, hook):  # the objective sees the output; the stream does not carry its gradient on
        outputs[hook.layer()] = attn_out
        return attn_out.detach()

    hooks = [(lambda name: name.endswith("attn.hook_pattern"), make_leaf),
             (lambda name: name.endswith("hook_attn_out"), cut)]
    images = images.detach()
    with torch.inference_mode(False), torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        model(images.clone())
        layers = sorted(leaves)
        projected = torch.stack([model.unembed(outputs[b]) for b in layers], 1)  # [batch layers pos classes]
        index = target.view(-1, 1, 1, 1).expand(*projected.shape[:3], 1)
        if compat:
            objective = -F.log_softmax(projected.softmax(-1), -1).gather(-1, index)  # CE on probabilities
        else:
            objective = projected.gather(-1, index)
        if tokens is not None:
            objective = objective[:, :, tokens.to(objective.device)]
        grads = torch.autograd.grad(objective.sum(), [leaves[b] for b in layers])
    return torch.stack(grads, 1), torch.stack([leaves[b].detach() for b in layers], 1)


@register("class_embedding", options={}, resolution="tokens", needs_grad=True,
          description="gradients of each block's class-embedding-projected attention output w.r.t. its attention "
                      "probabilities, CLS row summed over heads and blocks",
          paper="Vilas et al., Analyzing Vision Transformers for Image Classification in Class Embedding Space, "
                "NeurIPS 2023")
def importance(model, images: torch.Tensor, target: torch.Tensor, *, compat: bool = False) -> torch.Tensor:
    """Token importance maps [batch grid_h grid_w]: ``sum_b sum_h grads[b, h, CLS, patches]``.

    Higher = the token's attention weight raises the class (default: the gradient of the class logit;
    ``compat=True``: minus the gradient of the original's double-softmax loss, its ``-sum grads``).
    """
    cls = _require_cls(model, "class-embedding saliency")
    grads, _ = class_embedding_gradients(model, images, target, compat=compat, tokens=[cls])
    layout = model.layout_for(images)
    scores = grads[:, :, :, cls].sum((1, 2))[:, layout.tokens("patches").to(grads.device)]
    return (-scores if compat else scores).reshape(len(images), *layout.grid)


# ---------------------------------------------------------------------------------------------------------
# Token-removal curves


def token_removal_curve(model, images: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, *,
                        order: str = "negative", n_keep: Sequence[int] | None = None,
                        batch_size: int = 256) -> torch.Tensor:
    """Accuracy (float64 [len(n_keep)]) when only the n best (or worst) patch tokens are kept, for each n: the
    mean over images of :func:`token_removal_hits` (same arguments)."""
    hits = token_removal_hits(model, images, labels, scores, order=order, n_keep=n_keep, batch_size=batch_size)
    return hits.sum(1, dtype=torch.float64) / len(images)


def token_removal_hits(model, images: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, *,
                       order: str = "negative", n_keep: Sequence[int] | None = None,
                       batch_size: int = 256) -> torch.Tensor:
    """Whether each image is still classified as its label when only its n best (or worst) patch tokens are
    kept: bool [len(n_keep) batch] on the CPU, one row per n (each image's own 0/1 token-removal curve).

    Args:
        images: [batch C H W]; labels: long [batch].
        scores: patch scores [batch grid_h grid_w] or [batch patches] (any map; higher = more important).
        order: ``"negative"`` keeps the highest scores (the least important go first; a good map keeps
            accuracy high), ``"positive"`` the lowest (a good map loses accuracy fast).
        n_keep: patch counts to keep, default ``1 .. patches - 1`` (the study's 1..48 for ViT-B/32).
        batch_size: forward rows (images x counts) per call; each call groups its rows by count.
    The prefix tokens (CLS, registers) are always kept. Ties keep the earlier patch first.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (keep the most or the least important first), got {order!r}")
    layout = model.layout_for(images)
    n_patches = layout.n_patches
    scores = scores.reshape(len(images), -1)
    if scores.shape[1] != n_patches:
        raise ValueError(f"scores have {scores.shape[1]} values per image but the model has {n_patches} patches "
                         f"(grid {layout.grid}); pass maps [batch {layout.grid[0]} {layout.grid[1]}]")
    n_keep = torch.as_tensor(list(range(1, n_patches)) if n_keep is None else list(n_keep), dtype=torch.long)
    if len(n_keep) == 0 or not (0 < n_keep.min() and n_keep.max() <= n_patches):
        raise ValueError(f"n_keep must be patch counts in [1, {n_patches}]")
    ranked = scores.float() if order == "negative" else -scores.float()
    order_index = ranked.argsort(dim=1, descending=True, stable=True)
    place = torch.empty_like(order_index).scatter_(1, order_index, torch.arange(n_patches).expand_as(order_index))
    patches = layout.tokens("patches").to(images.device)
    labels = labels.to(images.device)
    hits = torch.zeros(len(n_keep), len(images), dtype=torch.bool)
    per_call = max(1, batch_size // len(images))
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk, place_chunk = images[start:start + batch_size], place[start:start + batch_size].to(images.device)
            for first in range(0, len(n_keep), per_call):
                counts = n_keep[first:first + per_call].to(images.device)
                keep = torch.zeros(len(counts), len(chunk), layout.n_tokens, dtype=torch.bool, device=images.device)
                keep[:, :, patches] = place_chunk[None] < counts[:, None, None]
                logits = forward_kept(model, chunk.repeat(len(counts), 1, 1, 1), keep.flatten(0, 1))
                correct = logits.argmax(-1).view(len(counts), len(chunk)) == labels[start:start + batch_size]
                hits[first:first + len(counts), start:start + len(chunk)] = correct.cpu()
    return hits


def auc_study(curve: torch.Tensor, n_patches: int | None = None) -> float:
    """The study's AUC: ``sum(acc) / (max(acc) * N)`` with N the patch count (default ``len(curve) + 1``,
    the study's curve over n = 1..N-1; 49 for ViT-B/32). Normalised by the curve's own maximum."""
    curve = torch.as_tensor(curve, dtype=torch.float64)
    n_patches = len(curve) + 1 if n_patches is None else n_patches
    return float(curve.sum() / (curve.max() * n_patches)) if curve.max() > 0 else 0.0


def auc(curve: torch.Tensor, n_keep: Sequence[int] | None = None, n_patches: int | None = None) -> float:
    """Plain AUC: the trapezoid area under accuracy against the fraction of patches kept (n / N), divided by
    the span of that fraction: a mean accuracy in [0, 1], not rescaled by the curve's maximum.
    Defaults as :func:`token_removal_curve`: n = 1..N-1, N = ``len(curve) + 1``."""
    curve = np.asarray(curve, dtype=np.float64)
    n_patches = len(curve) + 1 if n_patches is None else n_patches
    fraction = np.arange(1, len(curve) + 1) / n_patches if n_keep is None else np.asarray(n_keep) / n_patches
    if len(curve) < 2:
        return float(curve.mean())
    return float(np.trapezoid(curve, fraction) / (fraction[-1] - fraction[0]))


def random_curve(model, images: torch.Tensor, labels: torch.Tensor, *, n_perms: int = 10, seed: int = 0,
                 n_keep: Sequence[int] | None = None, batch_size: int = 256) -> torch.Tensor:
    """Mean accuracy [len(n_keep)] over `n_perms` random orderings; each ordering is one permutation of the
    patches shared by all images (``torch.randperm`` seeded with ``seed + p``, as the study's seeds 0..9)."""
    n_patches = model.layout_for(images).n_patches
    curves = []
    for p in range(n_perms):
        permutation = torch.randperm(n_patches, generator=torch.Generator().manual_seed(seed + p))
        scores = torch.empty(n_patches).scatter_(0, permutation, -torch.arange(n_patches, dtype=torch.float))
        curves.append(token_removal_curve(model, images, labels, scores.expand(len(images), -1).to(images.device),
                                          n_keep=n_keep, batch_size=batch_size))
    return torch.stack(curves).mean(0)


def probe_scores(ranks: torch.Tensor, model) -> torch.Tensor:
    """Linear-probe ordering [n grid_h grid_w] from probe ranks [layers n tokens]
    (:func:`analyses.probing.probe_ranks`): minus the label's rank summed over layers, so the patches the
    probes read best come first (the study's ascending rank sum)."""
    patches = model.tokens("patches").to(ranks.device)
    return -ranks[:, :, patches].sum(0).float().reshape(ranks.shape[1], *model.layout.grid)


def oracle_scores(token_masks: torch.Tensor) -> torch.Tensor:
    """The true-object ordering [n grid_h grid_w]: each patch's object fraction (the dataset's ``token_mask``),
    so object tokens come first."""
    return torch.as_tensor(token_masks).float()


# ---------------------------------------------------------------------------------------------------------
# Over a dataset


def _batches(data, batch_size: int, device):
    from torch.utils.data import DataLoader

    for batch in DataLoader(data, batch_size=batch_size):
        yield batch["image"].to(device), torch.as_tensor(batch["label"]).to(device), batch.get("token_mask")


def run(model, data, store: str | os.PathLike | None = None, *, compat: bool = False, train_per_class: int = 10,
        methods: Sequence[str] = ("class_embedding", "linear_probe", "random", "oracle"), n_perms: int = 10,
        batch_size: int = 32, device=None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Token-removal curves and AUCs of the study's orderings over `data`.

    The first `train_per_class` images of each class train the linear probes (:mod:`analyses.probing`);
    the curves use the other images. Methods: ``class_embedding`` (:func:`importance`), ``linear_probe``,
    ``random`` (`n_perms` permutations) and ``oracle`` (the token masks; needs them). With `store`, each
    finished curve is kept as ``<store>/results/curves/<method>-<order>.csv`` and not recomputed.

    Returns ``(curves, aucs)``: curves with columns ``method, order, n_keep, accuracy`` and AUCs with
    ``method, order, auc_study, auc``.
    """
    from tqdm.auto import tqdm

    from analyses import probing

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    train, test = probing.split_per_class(data, train_per_class)
    images, labels, masks = [], [], []
    for image, label, mask in _batches(test, batch_size, device):
        images.append(image), labels.append(label), masks.append(mask)
    images, labels = torch.cat(images), torch.cat(labels)
    folder = None if store is None else Path(store) / "results" / "curves"
    rows = []
    for method in tqdm(methods, desc="token-removal curves", disable=not progress):
        orders = ORDERS if method != "random" else ORDERS[:1]  # a random order has no direction
        paths = {order: None if folder is None else folder / f"{method}-{order}.csv" for order in orders}
        done = {order: pd.read_csv(path) for order, path in paths.items() if path is not None and path.exists()}
        scores = None
        if len(done) < len(orders) and method != "random":
            scores = _scores(model, method, images, labels, masks, train, compat, batch_size, device)
        for order, path in paths.items():
            if order in done:
                rows.append(done[order])
                continue
            if scores is None:
                curve = random_curve(model, images, labels, n_perms=n_perms, batch_size=batch_size * 8)
            else:
                curve = token_removal_curve(model, images, labels, scores, order=order, batch_size=batch_size * 8)
            table = pd.DataFrame({"method": method, "order": order, "n_keep": np.arange(1, len(curve) + 1),
                                  "accuracy": curve.numpy()})
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                table.to_csv(path.with_suffix(".tmp"), index=False)
                path.with_suffix(".tmp").replace(path)
            rows.append(table)
    curves = pd.concat(rows, ignore_index=True)
    curves = pd.concat([curves, curves[curves.method == "random"].assign(order="positive")], ignore_index=True)
    aucs = curves.groupby(["method", "order"], sort=False)["accuracy"].agg(
        auc_study=lambda a: auc_study(torch.tensor(a.to_numpy())), auc=lambda a: auc(a.to_numpy())).reset_index()
    return curves, aucs


def _scores(model, method, images, labels, masks, train, compat, batch_size, device) -> torch.Tensor:
    """The ordering maps [n grid_h grid_w] of one method for the test `images` [n C H W] (on the device)."""
    if method == "class_embedding":
        return torch.cat([importance(model, images[i:i + batch_size], labels[i:i + batch_size], compat=compat)
                          for i in range(0, len(images), batch_size)])
    if method == "linear_probe":
        from torch.utils.data import StackDataset

        from analyses import probing

        loaded = StackDataset(image=images, label=labels)  # the test images run() read, not the split once more
        ranks = probing.probe_ranks(probing.extract_features(model, train, batch_size=batch_size),
                                    probing.extract_features(model, loaded, batch_size=batch_size),
                                    model.cfg.d_vocab, compat=compat, device=device)
        return probe_scores(ranks, model).to(device)
    if method == "oracle":
        if any(mask is None for mask in masks):
            raise ValueError("the oracle ordering needs token masks (an ImageNet-S or scenes dataset); drop "
                             "'oracle' from methods")
        return oracle_scores(torch.cat(masks)).to(device)
    raise ValueError(f"unknown ordering {method!r}; expected class_embedding, linear_probe, random or oracle")


def plot(curves: pd.DataFrame):
    """Accuracy against the % of patch tokens removed, one line per method and order (the study's figure:
    the curve flipped, x = 100 * (N - n) / N)."""
    import plotly.express as px

    n_patches = curves["n_keep"].max() + 1
    table = curves.assign(removed=100 * (n_patches - curves["n_keep"]) / n_patches)
    fig = px.line(table, x="removed", y="accuracy", color="method", line_dash="order", markers=False,
                  labels={"removed": "% of tokens removed", "accuracy": "accuracy"})
    fig.update_layout(title="Token-removal curves")
    return fig


def cli(args) -> None:
    """``vitlens analyze saliency``: token-removal curves of the study's orderings; the AUC table is printed
    and written with the curves under ``STORE/results/``."""
    from analyses.class_embedding import load_inputs, write_tables

    model, data = load_inputs(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    curves, aucs = run(model, data, args.store, compat=args.compat, train_per_class=args.train_per_class,
                       methods=methods, n_perms=args.n_perms, batch_size=args.batch_size, device=args.device,
                       progress=not args.no_progress)
    write_tables(args.store, {"perturbation_auc": aucs})
    curves.to_csv(Path(args.store) / "results" / "token_removal_curves.csv", index=False)
