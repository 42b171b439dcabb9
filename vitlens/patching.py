"""Activation patching from an ActivationStore, and patching sweeps over the token grid.

Run a model while chosen hooks are replaced, at chosen token positions, by values read from a store: another
sample's activation, a mean over samples (e.g. of one class), or zero. :func:`patch_sweep` patches one
(hook, token) at a time and returns a tidy DataFrame whose position axis is the token grid (CLS, registers,
patches with their (row, col)). TransformerLens' own per-position sweeps cannot be used on images: they
take the number of positions from the last axis of the input, which for an image is its width.

Example::

    store = ActivationStore("cache/clean", model=model)
    patch = Patch("blocks.3.hook_resid_post", source=17, tokens=model.tokens("patches"))
    logits = run_patched(model, corrupted_images, store, [patch])
    df = patch_sweep(model, corrupted_images, store, "blocks.*.hook_resid_pre", source=17,
                     metric=lambda logits: logits[:, 3])       # columns: hook layer token kind name row col metric
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from vitlens.store import ActivationStore, OutputSpec, StoreMismatchError


def token_table(layout) -> pd.DataFrame:
    """One row per token of a :class:`~vitlens.TokenLayout`: token, kind (cls, dist, register, patch),
    name (``layout.describe``) and the patch grid row and col (NA for prefix tokens)."""
    rows = []
    for token in range(layout.n_tokens):
        name = layout.describe(token)
        patch = token >= layout.n_prefix
        row, col = layout.patch_position(token) if patch else (pd.NA, pd.NA)
        kind = "patch" if patch else "register" if name.startswith("reg") else name
        rows.append({"token": token, "kind": kind, "name": name, "row": row, "col": col})
    return pd.DataFrame(rows).astype({"row": "Int64", "col": "Int64"})


def patch_value(store: ActivationStore, hook: str, source, label: int | None = None) -> torch.Tensor:
    """The stored activation of `hook` to patch in: [*stored shape] (float32 for means).

    `source` is a sample index (that sample), a non-empty sequence of sample indices (their mean), "mean" (the
    mean over all samples, or over the samples of class `label`) or "zero". Means are accumulated in float64,
    one chunk of samples at a time.
    """
    array = store[hook]
    if isinstance(source, str):
        if source not in ("mean", "zero"):
            raise ValueError(f"unknown patch source {source!r}; use a sample index, indices, 'mean' or 'zero'")
        if source == "zero":
            if label is not None:
                raise ValueError("label= selects the samples of a 'mean' source; a 'zero' source takes none")
            return torch.zeros(array.shape[1:], dtype=torch.float32)
        labels = store.samples["label"].to_numpy()
        source = np.flatnonzero(labels == label) if label is not None else np.arange(len(store))
        if len(source) == 0:
            raise ValueError(f"{store.path} has no sample" + (f" of class {label}" if label is not None else "s"))
    elif label is not None:
        raise ValueError("label= selects the samples of a 'mean' source; it does not apply to sample indices")
    if np.ndim(source) == 0:
        return torch.from_numpy(array[int(source)])
    indices = np.asarray(source)
    if len(indices) == 0:
        raise ValueError("source is an empty list of sample indices; pass at least one index, 'mean' or 'zero'")
    total = np.zeros(array.shape[1:], dtype=np.float64)
    for chunk in np.array_split(indices, max(1, len(indices) // 256)):
        total += array[chunk].sum(axis=0, dtype=np.float64)
    return torch.from_numpy(total / len(indices)).float()


@dataclass(frozen=True)
class Patch:
    """Replace `hook` at `tokens` (layout indices, e.g. ``model.tokens("patches")``; None for the whole
    activation) with the store's value from `source` (see :func:`patch_value`; `label` restricts a "mean"
    to one class)."""

    hook: str
    source: int | Sequence[int] | str
    tokens: Sequence[int] | None = None
    label: int | None = None


def patch_hooks(store: ActivationStore, patches: Sequence[Patch], device="cpu") -> list[tuple[str, Callable]]:
    """``fwd_hooks`` for ``model.run_with_hooks`` / ``model.hooks`` that apply `patches` to every image
    (`device`: the model's)."""
    hooks = []
    for patch in patches:
        spec = store[patch.hook].spec
        value = patch_value(store, patch.hook, patch.source, patch.label).to(device)
        hooks.append((patch.hook, _replace_tokens(spec, value, patch.tokens)))
    return hooks


def run_patched(model, images: torch.Tensor, store: ActivationStore, patches: Sequence[Patch]) -> torch.Tensor:
    """Logits [batch n_classes] of `images` with `patches` applied (inference mode, on the model's device)."""
    store.check_model(model)
    _check_layout(model, images, store, [store[patch.hook].spec for patch in patches])
    device = _device(model)
    with torch.inference_mode():
        return model.run_with_hooks(images.to(device), fwd_hooks=patch_hooks(store, patches, device))


def patch_sweep(model, images: torch.Tensor, store: ActivationStore, hooks: str | Sequence[str], source,
                metric: Callable[[torch.Tensor], torch.Tensor], *, tokens: Sequence[int] | str = "all",
                label: int | None = None, batch_size: int = 64) -> pd.DataFrame:
    """Patch each hook at each token, one (hook, token) at a time, and measure `metric` on the logits.

    Args:
        images: [b chans h w], the run being patched (e.g. corrupted images).
        hooks: recorded hook names or glob patterns (``"blocks.*.hook_resid_pre"``).
        source: what to patch in (see :func:`patch_value`), e.g. the clean donor's sample index.
        metric: logits [b n_classes] -> [b] (e.g. ``lambda logits: logits[:, c]``); averaged over images.
        tokens: layout tokens to sweep: "all", a kind ("patches", ...) or indices; each must be stored.
        batch_size: images per forward: each forward runs ``batch_size // b`` token positions (at least one),
            a copy of the b images for each.

    Returns a DataFrame with one row per (hook, token): hook, layer, token, kind, name, row, col, metric.
    """
    store.check_model(model)
    names = _expand(store, hooks)
    _check_layout(model, images, store, [store.outputs[hook] for hook in names])
    layout = model.layout_for(images)
    positions = layout.tokens(tokens) if isinstance(tokens, str) else torch.as_tensor(tokens).flatten()
    if len(positions) == 0:
        raise ValueError(f"tokens={tokens!r} selects no token of the layout; pass a kind the model has or indices")
    n_images = len(images)
    group = max(1, batch_size // n_images)
    device = _device(model)
    tiled = images.to(device).repeat(min(group, len(positions)), 1, 1, 1)  # row k * n_images + j: image j, position k
    metrics = []
    for hook in names:
        spec = store.outputs[hook]
        value = patch_value(store, hook, source, label).to(device)
        for start in range(0, len(positions), group):
            chosen = positions[start:start + group]
            fn = _replace_tokens(spec, value, chosen.repeat_interleave(n_images), per_row=True)
            with torch.inference_mode():
                logits = model.run_with_hooks(tiled[:len(chosen) * n_images], fwd_hooks=[(hook, fn)])
            metrics += [metric(part).float().mean() for part in logits.view(len(chosen), n_images, -1)]
    sweep = pd.DataFrame({"hook": np.repeat(names, len(positions)), "token": positions.tolist() * len(names)})
    sweep.insert(1, "layer", pd.array([_layer(hook) for hook in sweep["hook"]], dtype="Int64"))
    return sweep.merge(token_table(layout), on="token", how="left").assign(metric=torch.stack(metrics).tolist())


def _check_layout(model, images: torch.Tensor, store: ActivationStore, specs: Sequence[OutputSpec]) -> None:
    """Token positions only carry over between the store and `images` when their token grids agree."""
    if all(spec.token_axis is None for spec in specs):
        return
    grid, recorded = model.layout_for(images).grid, store.layout.grid
    if grid != recorded:
        raise StoreMismatchError(f"the images give a {grid[0]}x{grid[1]} token grid but {store.path} was recorded on "
                                 f"a {recorded[0]}x{recorded[1]} grid; patch images of the size the store was "
                                 "recorded at")


def _replace_tokens(spec: OutputSpec, value: torch.Tensor, positions, per_row: bool = False) -> Callable:
    """A hook fn that writes `value` (stored shape, on the model's device) into the activation at layout token
    `positions`.

    `positions` None replaces the whole activation. With `per_row`, `positions` holds one token per row
    of the batch; otherwise every row is patched at all `positions`.
    """
    if positions is None:
        if spec.tokens is not None:
            raise ValueError(f"{spec.name} was recorded at tokens {list(spec.tokens)} only, so it cannot be "
                             "patched whole; pass tokens= (some of those)")
        return lambda activation, hook: value.to(activation.dtype).expand_as(activation).clone()
    if spec.token_axis is None:
        raise ValueError(f"{spec.name} has no token axis; patch it whole (tokens=None)")
    positions = torch.as_tensor(positions, dtype=torch.long)
    stored = positions if spec.tokens is None else _stored_positions(spec, positions)
    rows_of_value = value.movedim(spec.token_axis, 0)[stored.to(value.device)]  # [n positions, *other axes]
    index = positions.to(value.device)
    batch_rows = torch.arange(len(index), device=value.device) if per_row else slice(None)

    def hook_fn(activation, hook):
        patched = activation.clone()
        tokens_first = patched.movedim(spec.token_axis + 1, 1)  # a view: writes land in `patched`
        tokens_first[batch_rows, index] = rows_of_value.to(activation.dtype)
        return patched

    return hook_fn


def _stored_positions(spec: OutputSpec, positions: torch.Tensor) -> torch.Tensor:
    """Layout token indices -> positions along the stored token axis (which keeps only `spec.tokens`)."""
    lookup = {token: i for i, token in enumerate(spec.tokens)}
    missing = sorted(set(positions.tolist()) - set(lookup))
    if missing:
        raise ValueError(f"tokens {missing} of {spec.name} are not in the store (it kept tokens {list(spec.tokens)})")
    return torch.tensor([lookup[t] for t in positions.tolist()])


def _expand(store: ActivationStore, hooks: str | Sequence[str]) -> list[str]:
    names = []
    for pattern in [hooks] if isinstance(hooks, str) else hooks:
        matched = fnmatch.filter([n for n, s in store.outputs.items() if s.hook], pattern)
        names += matched or [store[pattern].name]  # store[...] raises, naming what is recorded
    return names


def _layer(hook: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


def _device(model) -> torch.device:
    return next(model.parameters()).device
