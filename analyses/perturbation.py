"""Attention and token perturbations of vit-cls_emb (§A6-A7): how much do attention and context build the classes?

Two kinds of edit, both as TransformerLens hooks on an unmodified model (never a model fork):

- **attention** (:func:`attention_hooks`): ``self_only`` makes every image-token query attend only to itself;
  ``no_cls`` removes what image tokens read from CLS (column 0 of their rows, not renormalised), in all
  blocks or chosen blocks and heads;
- **tokens** (:func:`forward_kept`): the model runs on a subset of its tokens, dropped right after the
  position embedding (``hook_full_embed``), so the sequence, and every later activation, shrinks. The
  context perturbation keeps CLS plus the object tokens (``"context"``: context removed) or CLS plus the
  context tokens (``"class_label"``: object removed), from the dataset's token masks. Token-removal curves of
  saliency and faithfulness methods (keep the top-n tokens) use the same function.

:func:`ranks` gives the label's rank at the last layer for every token of a perturbed run, :func:`run` the
study's table over a dataset and :func:`plot` its figure.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from analyses.class_embedding import ClassRankReducer, label_rank
from vitlens.recorder import Computation

HookList = Sequence[tuple[str, Callable]]


# ---------------------------------------------------------------------------------------------------------
# Token dropping


def kept_indices(model, images: torch.Tensor, keep: torch.Tensor, *, keep_prefix: bool = True) -> list[torch.Tensor]:
    """The kept token indices of each image, sorted (layout order), as a list of int64 [n_keep_i] tensors.

    keep: bool [batch tokens] (True = keep) or int [batch n_keep] token indices (the same count per image;
    duplicates count once). With `keep_prefix` the prefix tokens (CLS, distillation, registers) are added;
    without it they must be kept explicitly, since the head reads them (CLS pooling) or skips them (average
    pooling) by position.
    """
    layout = model.layout_for(images)
    n_tokens, batch = layout.n_tokens, images.shape[0]
    keep = torch.as_tensor(keep, device=images.device)
    if keep.ndim != 2 or keep.shape[0] != batch:
        raise ValueError(f"keep must be bool [batch tokens] or int [batch n_keep] with batch {batch}, got shape "
                         f"{tuple(keep.shape)}")
    if keep.dtype == torch.bool:
        if keep.shape[1] != n_tokens:
            raise ValueError(f"a bool keep mask needs one column per token ({n_tokens} tokens, CLS first), got "
                             f"{keep.shape[1]}; model.layout lists the token order")
        mask = keep.clone()
    else:
        if keep.is_floating_point():
            raise ValueError("keep must be a bool mask or integer token indices, got floats; threshold a mask "
                             "first (e.g. token_mask > 0)")
        if keep.numel() and not 0 <= int(keep.min()) <= int(keep.max()) < n_tokens:
            raise ValueError(f"token indices in keep must lie in [0, {n_tokens}), got {int(keep.min())}.."
                             f"{int(keep.max())}")
        mask = torch.zeros(batch, n_tokens, dtype=torch.bool, device=images.device)
        mask.scatter_(1, keep.long(), True)
    prefix = layout.tokens("prefix").to(images.device)
    if keep_prefix:
        mask[:, prefix] = True
    elif len(prefix) and not mask[:, prefix].all():
        raise ValueError("keep drops a prefix token (CLS/distillation/register) but the model's head reads "
                         "the prefix tokens by position; keep them, or pass keep_prefix=True")
    if not mask.any(1).all():
        raise ValueError("keep leaves an image with no token at all; keep at least one token per image")
    return [row.nonzero().squeeze(1) for row in mask]


def forward_kept(model, images: torch.Tensor, keep: torch.Tensor, *, fwd_hooks: HookList = (),
                 return_resid: bool = False, keep_prefix: bool = True):
    """Run `model` on only some tokens of each image, dropping the others right after the position embedding.

    This is the token perturbation of vit-cls_emb (§A7, their ``tokens_mask``): the kept tokens are gathered
    right after ``hook_full_embed`` (which still sees every token), so the blocks see a shorter sequence (in
    layout order, prefix tokens first) and the dropped tokens take no part in attention at all. The head then pools what is left: CLS for
    CLS-pooling models, the mean of the kept patches for average-pooling ones.

    Args:
        model: a :class:`~vitlens.HookedViT`.
        images: [batch chans height width], preprocessed.
        keep: bool [batch tokens] (True = keep, the model's token layout: ``model.layout``) or int token
            indices [batch n_keep] (the same count for every image). Images that keep different numbers of
            tokens are run in groups of equal count (one forward per group).
        fwd_hooks: extra TransformerLens ``(name, fn)`` hooks for the same forward (e.g. from
            :func:`attention_hooks`), removed on return. Hooks after ``hook_full_embed`` see the shortened
            sequence: position i is the i-th kept token, and the prefix tokens keep their positions (0 = CLS).
        return_resid: also return the last block's residual (``blocks.{L-1}.hook_resid_post``) of the
            kept tokens, put back at their layout positions.
        keep_prefix: add the prefix tokens (CLS, distillation, registers) to every kept set (default). With
            False, `keep` must list them itself.

    Returns:
        logits [batch classes]; with `return_resid`, ``(logits, resid)`` where resid is
        [batch tokens d_model] in the full layout, NaN at the dropped tokens (``resid.isnan().any(-1)``
        tells which). Keeping every token gives exactly the unperturbed logits.

    Gradients flow when called under grad (e.g. for saliency); wrap in ``torch.inference_mode()`` otherwise.
    """
    indices = kept_indices(model, images, keep, keep_prefix=keep_prefix)
    counts = torch.tensor([len(i) for i in indices])
    logits = resid = None
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for count in counts.unique().tolist():
            rows = (counts == count).nonzero().squeeze(1).to(images.device)
            index = torch.stack([indices[i] for i in rows.tolist()])[:, :, None]  # [group n_keep 1]
            # HookedViT.forward, step by step, with the sequence shortened after hook_full_embed
            x = model.embed(images[rows])
            x = x.gather(1, index.expand(-1, -1, x.shape[-1]))
            for block in model.blocks:
                x = block(x)
            out = model.forward_head(model.ln_final(x))
            logits = out.new_empty(len(images), out.shape[-1]) if logits is None else logits
            logits = logits.index_copy(0, rows, out)
            if return_resid:
                if resid is None:
                    n_tokens = model.layout_for(images).n_tokens
                    resid = x.new_full((len(images), n_tokens, x.shape[-1]), float("nan"))
                full = x.new_full((len(rows), resid.shape[1], x.shape[-1]), float("nan"))
                resid = resid.index_copy(0, rows, full.scatter(1, index.expand(-1, -1, x.shape[-1]), x))
    return (logits, resid) if return_resid else logits


# ---------------------------------------------------------------------------------------------------------
# Attention perturbation

ATTENTION_KINDS = ("self_only", "no_cls")


def attention_hooks(model, kind: str, layers: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None) -> list[tuple[str, Callable]]:
    """TransformerLens ``fwd_hooks`` that edit the attention pattern (post-softmax, before A·V), §A6.

    kind:
        ``"self_only"``: every image-token (patch) query row becomes one-hot on itself, so image tokens
        read only their own value; prefix-token rows (CLS) are unchanged.
        ``"no_cls"``: every patch query row loses its CLS column (set to 0, **not** renormalised, so those
        rows sum to less than 1, as in the study); the rest of the pattern is unchanged. Needs a class token.
    layers: blocks to edit (default all, as in the study); heads: heads to edit (default all).

    Patch rows are those after the model's prefix tokens, so the hooks also work on the shortened sequences
    of :func:`forward_kept` (prefix tokens keep their positions there). Use with
    ``model.run_with_hooks(images, fwd_hooks=attention_hooks(model, "no_cls"))``; the pattern
    [batch head query key] is edited on a copy, so gradients stay correct.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention perturbation {kind!r}; expected one of {ATTENTION_KINDS}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = range(n_layers) if layers is None else [int(layer) for layer in layers]
    if any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers {list(layers)} must lie in [0, {n_layers})")
    head_index = None if heads is None else torch.as_tensor([int(h) for h in heads], dtype=torch.long)
    if head_index is not None and (not len(head_index) or not 0 <= int(head_index.min()) <= int(head_index.max())
                                   < n_heads):
        raise ValueError(f"heads {list(heads)} must be a non-empty list in [0, {n_heads})")
    first_patch = model.layout.n_prefix
    cls = model.layout.cls_index
    if kind == "no_cls" and cls is None:
        raise ValueError(f"no_cls removes attention to the class token, but {model.cfg.model_name} has none "
                         "(global-average-pool model); use self_only or a model with a class token")

    def edit(pattern: torch.Tensor, hook) -> torch.Tensor:
        """[batch head query key] -> the edited copy."""
        edited = pattern.clone()
        rows = edited[:, :, first_patch:]  # a view: [batch head patches key]
        if kind == "self_only":
            n = rows.shape[2]
            eye = torch.eye(n, dtype=pattern.dtype, device=pattern.device)
            new = torch.cat([rows.new_zeros(n, first_patch), eye], dim=1).expand_as(rows)
        else:
            new = rows.clone()
            new[..., cls] = 0
        if head_index is None:
            rows.copy_(new)
        else:
            index = head_index.to(pattern.device)
            rows[:, index] = new[:, index]
        return edited

    return [(f"blocks.{layer}.attn.hook_pattern", edit) for layer in layers]


# ---------------------------------------------------------------------------------------------------------
# Perturbed ranks

CONTEXT_KINDS = ("context", "class_label")
KINDS = ("none", *ATTENTION_KINDS, *CONTEXT_KINDS)
""""none" (the unperturbed model), the attention edits and the token sets: "context" keeps CLS and the object
tokens (context removed), "class_label" keeps CLS and the context tokens (object removed)."""


def perturbed_forward(model, images: torch.Tensor, labels: torch.Tensor, kind: str, *,
                      token_mask: torch.Tensor | None = None, threshold: float = 0.0):
    """(logits [batch classes], ranks int64 [batch tokens]) of one perturbed forward; see :func:`ranks`."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {KINDS}")
    n_tokens = model.layout_for(images).n_tokens
    keep = torch.ones(len(images), n_tokens, dtype=torch.bool, device=images.device)
    if kind in CONTEXT_KINDS:
        if token_mask is None:
            raise ValueError(f"{kind} perturbation needs token_mask [batch grid_h grid_w] (the dataset's "
                             "segmentation on the token grid); this dataset has none: use ImageNet-S or the scenes")
        is_object = token_mask.to(images.device).reshape(len(images), -1) > threshold
        n_prefix = model.layout.n_prefix
        if is_object.shape[1] != n_tokens - n_prefix:
            raise ValueError(f"token_mask has {is_object.shape[1]} cells but the model has "
                             f"{n_tokens - n_prefix} patches; build the masks on the model's token grid")
        keep[:, n_prefix:] = is_object if kind == "context" else ~is_object
    hooks = attention_hooks(model, kind) if kind in ATTENTION_KINDS else ()
    logits, resid = forward_kept(model, images, keep, fwd_hooks=hooks, return_resid=True)
    rank = label_rank(model.unembed(resid), labels.to(images.device))
    return logits, rank.masked_fill(resid.isnan().any(-1), -1)


def ranks(model, images: torch.Tensor, labels: torch.Tensor, kind: str, *, token_mask: torch.Tensor | None = None,
          threshold: float = 0.0) -> torch.Tensor:
    """The label's rank at the last layer, for every token of a perturbed forward: int64 [batch tokens], -1 where
    the token was dropped (§A6-A7: the study's ``pos`` at ``blocks[-1]``, CLS included).

    kind: "none", "self_only", "no_cls" (:func:`attention_hooks` in every block), "context" or "class_label"
    (tokens dropped after the position embedding, :func:`forward_kept`; `token_mask` [batch grid_h grid_w]
    is the object on the token grid, object = ``token_mask > threshold``). Ranks count strictly larger logits.
    """
    return perturbed_forward(model, images, labels, kind, token_mask=token_mask, threshold=threshold)[1]


class PerturbedRun(Computation):
    """Recorder computations of one perturbation: ``<kind>_rank`` (int16 [tokens], -1 = dropped) and
    ``<kind>_logits`` (float32 [classes]); the two share one forward per batch."""

    def __init__(self, kind: str, what: str, threshold: float = 0.0, shared: dict | None = None):
        self.kind, self.what, self.threshold = kind, what, threshold
        self.name, self.dtype = f"{kind}_{what}", "int16" if what == "rank" else "float32"
        self._shared = {} if shared is None else shared

    def shape(self, model) -> tuple[int, ...]:
        return (model.layout.n_tokens,) if self.what == "rank" else (model.cfg.d_vocab,)

    def compute(self, model, images, labels, batch=None):
        if self._shared.get("images") is not images:
            mask = (batch or {}).get("token_mask") if self.kind in CONTEXT_KINDS else None
            self._shared.update(images=images, result=perturbed_forward(model, images, labels, self.kind,
                                                                        token_mask=mask, threshold=self.threshold))
        logits, rank = self._shared["result"]
        return rank if self.what == "rank" else logits

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, "kind": self.kind, "what": self.what, "threshold": self.threshold}


class _LastLayerRank(ClassRankReducer):
    """The unperturbed label rank of every token at the last layer only: int16 [n, 1, tokens]."""

    def hooks(self, model) -> list[str]:
        return super().hooks(model)[-1:]

    def shape(self, model) -> tuple[int, ...]:
        return 1, model.layout.n_tokens


def record(model, data, kind: str, path: str | os.PathLike, *, threshold: float = 0.0, batch_size: int = 32,
           device=None, progress: bool = True, **record_options):
    """Record the perturbed and the unperturbed last-layer ranks and logits of `kind` over `data` into the store
    at `path` (resumable): ``<kind>_rank``, ``<kind>_logits``, ``reference_rank`` [n, 1, tokens] and
    ``hook_logits``. Returns the store."""
    from vitlens.recorder import record as record_store

    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}; expected one of {KINDS}")
    shared: dict = {}
    computations = [PerturbedRun(kind, what, threshold, shared) for what in ("rank", "logits")]
    return record_store(model, data, path, hooks={"hook_logits": "all"},
                        reducers=[_LastLayerRank(name="reference_rank", precision="float32")],
                        computations=computations, dtype="float32", batch_size=batch_size, device=device,
                        progress=progress, **record_options)


def run(model, data, kind: str, *, compat: bool = False, store: str | os.PathLike | None = None,
        threshold: float = 0.0, batch_size: int = 32, device=None, progress: bool = False,
        **record_options) -> pd.DataFrame:
    """The study's perturbation table for one `kind` over `data`: one row with columns ``kind, rate,
    reference_rate, accuracy, reference_accuracy, n_images``.

    rate: the identifiability rate at the last layer under the perturbation (% of tokens with rank 0, per
    image, averaged over images); reference_rate: the same for the unperturbed model; accuracy and
    reference_accuracy: top-1 %. By default both rates use the same tokens: the image tokens that the
    perturbation kept (every patch for attention edits), images with none left out.

    ``compat=True`` reproduces the study's printouts (§A6-A7, §A12.8): for attention edits the perturbed rate
    counts every token including CLS while the reference counts image tokens only; for context edits both
    count the kept tokens including CLS.

    With `store` the per-image results are recorded there (:func:`record`; running again finishes only the
    missing images), otherwise in a temporary store.
    """
    if store is None:
        with tempfile.TemporaryDirectory(prefix="vitlens-perturbation-") as folder:
            return run(model, data, kind, compat=compat, store=Path(folder) / kind, threshold=threshold,
                       batch_size=batch_size, device=device, progress=progress, **record_options)
    with record(model, data, kind, store, threshold=threshold, batch_size=batch_size, device=device,
                progress=progress, **record_options) as recorded:
        return table(recorded, kind, compat=compat)


def table(store, kind: str, *, compat: bool = False) -> pd.DataFrame:
    """The one-row table of :func:`run` from a store written by :func:`record`."""
    names = [f"{kind}_rank", f"{kind}_logits", "reference_rank", "hook_logits"]
    missing = [name for name in names if name not in store]
    if missing:
        raise KeyError(f"{store.path} has no {missing}; record them with `vitlens analyze "
                       f"{'attention' if kind in ATTENTION_KINDS else 'context'}-perturbation` "
                       f"(analyses.perturbation.record)")
    perturbed, logits = store[names[0]][:].astype(np.int64), store[names[1]][:]
    reference, reference_logits = store["reference_rank"][:, 0].astype(np.int64), store["hook_logits"][:]
    labels = store.samples["label"].to_numpy()
    layout = store.layout
    kept = perturbed >= 0
    patches = np.zeros_like(kept)
    patches[:, layout.n_prefix:] = True
    if not compat:
        perturbed_set = reference_set = kept & patches
    elif kind in CONTEXT_KINDS:
        perturbed_set = reference_set = kept
    else:
        perturbed_set, reference_set = kept, np.broadcast_to(np.arange(kept.shape[1]) >= 1, kept.shape)
    return pd.DataFrame([{
        "kind": kind,
        "rate": _rate(perturbed, perturbed_set),
        "reference_rate": _rate(reference, reference_set),
        "accuracy": 100 * float((logits.argmax(1) == labels).mean()),
        "reference_accuracy": 100 * float((reference_logits.argmax(1) == labels).mean()),
        "n_images": len(labels),
    }])


def _rate(rank: np.ndarray, selected: np.ndarray) -> float:
    """% of the selected tokens with rank 0, per image, averaged over the images with any token selected."""
    counts = selected.sum(1)
    hits = ((rank == 0) & selected).sum(1)
    has = counts > 0
    return 100 * float((hits[has] / counts[has]).mean()) if has.any() else float("nan")


def plot(table: pd.DataFrame, *, y: str = "rate", title: str = ""):
    """Perturbed vs unperturbed `y` ("rate" or "accuracy") per kind: a plotly grouped bar Figure over the rows of
    one or more :func:`run` tables (``pd.concat`` them)."""
    import plotly.express as px

    if y not in ("rate", "accuracy"):
        raise ValueError(f"y={y!r} must be 'rate' or 'accuracy'")
    long = table.melt(id_vars="kind", value_vars=[y, f"reference_{y}"], var_name="model", value_name=f"{y} (%)")
    long["model"] = long["model"].map({y: "perturbed", f"reference_{y}": "unperturbed"})
    figure = px.bar(long, x="kind", y=f"{y} (%)", color="model", barmode="group")
    return figure.update_layout(title=title or None, template="plotly_white")


# ---------------------------------------------------------------------------------------------------------
# Command line (declared in analyses/commands.py)


def store_path(store: str | os.PathLike, kind: str) -> Path:
    """Where the ``vitlens analyze ...-perturbation`` commands record `kind`: ``<store>/perturbation/<kind>``."""
    return Path(store) / "perturbation" / kind


def _cli(args, kinds: Sequence[str], table_name: str) -> None:
    from analyses.class_embedding import load_inputs, random_model, random_twin_path, write_tables

    model, data = load_inputs(args)
    models = {table_name: (model, args.store)}
    if args.random_twin:  # the study's random baseline: the same perturbations on a seeded random init
        models[f"{table_name}_random"] = random_model(model), random_twin_path(args.store)
    tables = {name: pd.concat([run(m, data, kind, compat=args.compat, store=store_path(root, kind),
                                   batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
                               for kind in kinds], ignore_index=True) for name, (m, root) in models.items()}
    write_tables(args.store, tables)


def cli_attention(args) -> None:
    """``vitlens analyze attention-perturbation``: self_only and no_cls in every block."""
    _cli(args, ATTENTION_KINDS, "attention_perturbation")


def cli_context(args) -> None:
    """``vitlens analyze context-perturbation``: the object alone (context removed) and the context alone."""
    _cli(args, CONTEXT_KINDS, "context_perturbation")
