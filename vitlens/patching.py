"""Activation patching from an ActivationStore or an in-memory cache, and patching sweeps over the token grid.

Run a model while chosen hooks are replaced, at chosen token positions (and optionally one head), by values read
from a store or an :class:`~vitlens.ActivationCache`: another sample's activation, a mean over samples (e.g. of
one class), or zero. :func:`patch_sweep` patches one (hook, token) at a time and returns a tidy DataFrame whose
position axis is the token grid (CLS, registers, patches with their (row, col)). :func:`act_patch` runs
TransformerLens' own sweeps (``transformer_lens.patching``) through ``generic_activation_patch`` with an index
built from the token layout: called directly, TransformerLens would take the number of positions from the last
axis of the input, which for an image is its width (HookedViT refuses such a sweep rather than run it).

Example::

    store = ActivationStore("cache/clean", model=model)
    patch = Patch("blocks.3.hook_resid_post", source=17, tokens=model.tokens("patches"))
    logits = run_patched(model, corrupted_images, store, [patch])
    df = patch_sweep(model, corrupted_images, store, "blocks.*.hook_resid_pre", source=17,
                     metric=lambda logits: logits[:, 3])       # columns: hook layer token kind name row col metric
    _, clean_cache = model.run_with_cache(clean_images)
    grid = act_patch(model, corrupted_images, clean_cache, lambda logits: logits[:, 3].mean(), "resid_pre")
                                                               # [layer pos], TransformerLens' tensor
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import transformer_lens.patching as tl_patching

from vitlens.activation_cache import ActivationCache
from vitlens.recorder import token_axis
from vitlens.store import ActivationStore, OutputSpec, StoreMismatchError

MEAN_CHUNK = 256  # samples read at a time when a source is a mean


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


class CacheSource:
    """An in-memory :class:`~vitlens.ActivationCache` as a patch source: the same interface as an
    :class:`ActivationStore` for :func:`patch_value`, :func:`run_patched` and :func:`patch_sweep`, whose "samples"
    are the cache's batch rows (``labels`` [batch], optional, enable ``label=`` means)."""

    def __init__(self, cache: ActivationCache, model, labels=None):
        if not cache.has_batch_dim:
            raise ValueError("the cache has no batch axis (remove_batch_dim); patch from a cache with one")
        self.cache, self.path = cache, "the in-memory cache"
        self.outputs = {name: self._spec(name, value, model) for name, value in cache.items()}
        n = len(next(iter(cache.values()))) if len(cache) else 0
        self.samples = pd.DataFrame({"label": [-1] * n if labels is None else torch.as_tensor(labels).tolist()})

    @staticmethod
    def _spec(name: str, value: torch.Tensor, model) -> OutputSpec:
        tokens = tuple(model.layout.indices("patches")) if name == "hook_embed" else None
        axis = None if name.endswith("_grad") else token_axis(name)
        return OutputSpec(name, tuple(value.shape[1:]), str(value.dtype).removeprefix("torch."), hook=name,
                          tokens=tokens, token_axis=axis)

    def __getitem__(self, name: str) -> "_CacheArray":
        if name not in self.outputs:
            raise KeyError(f"{name} is not in the cache (it holds {sorted(self.outputs)}); run_with_cache with "
                           "names_filter including it")
        return _CacheArray(self.cache[name].detach().cpu().numpy(), self.outputs[name])

    def __len__(self) -> int:
        return len(self.samples)

    def check_model(self, model) -> None:
        if self.cache.model is not None and self.cache.model is not model:
            if self.cache.model.weights_hash() != model.weights_hash():
                raise StoreMismatchError("the cache was made by a model with other weights; patch with that model")


class _CacheArray(np.ndarray):
    """A numpy array that carries its :class:`OutputSpec` (as the store's arrays do)."""

    def __new__(cls, array: np.ndarray, spec: OutputSpec):
        obj = np.asarray(array).view(cls)
        obj.spec = spec
        return obj


def _source(store, model):
    """An ActivationStore as is; an ActivationCache wrapped in a :class:`CacheSource`."""
    if isinstance(store, ActivationCache):
        return CacheSource(store, model)
    if isinstance(store, (ActivationStore, CacheSource)):
        return store
    raise TypeError(f"a patch source is an ActivationStore or an ActivationCache, got {type(store).__name__}")


def patch_value(store, hook: str, source, label: int | None = None) -> torch.Tensor:
    """The stored activation of `hook` to patch in: [*stored shape] (float32 for means).

    `store` is an :class:`ActivationStore` or a :class:`CacheSource`. `source` is a sample index (that sample),
    a non-empty sequence of sample indices (their mean), "mean" (the mean over all samples, or over the samples
    of class `label`) or "zero". Means are accumulated in float64, :data:`MEAN_CHUNK` samples at a time.
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
        return torch.from_numpy(np.asarray(array[int(source)]))
    indices = np.asarray(source)
    if len(indices) == 0:
        raise ValueError("source is an empty list of sample indices; pass at least one index, 'mean' or 'zero'")
    total = np.zeros(array.shape[1:], dtype=np.float64)
    for start in range(0, len(indices), MEAN_CHUNK):
        total += np.asarray(array[indices[start:start + MEAN_CHUNK]]).sum(axis=0, dtype=np.float64)
    return torch.from_numpy(total / len(indices)).float()


@dataclass(frozen=True)
class Patch:
    """Replace `hook` at `tokens` (layout indices, e.g. ``model.tokens("patches")``; None for the whole
    activation) with the source's value from `source` (see :func:`patch_value`; `label` restricts a "mean"
    to one class). `head` patches one attention head only (hooks with a head axis: ``attn.hook_q/k/v/z/result``,
    ``hook_pattern``, ``hook_attn_scores``); for patterns and scores `tokens` are query tokens."""

    hook: str
    source: int | Sequence[int] | str
    tokens: Sequence[int] | None = None
    label: int | None = None
    head: int | None = None


def patch_hooks(store, patches: Sequence[Patch], device="cpu") -> list[tuple[str, Callable]]:
    """``fwd_hooks`` for ``model.run_with_hooks`` / ``model.hooks`` that apply `patches` to every image
    (`device`: the model's; `store`: an ActivationStore or a CacheSource)."""
    hooks = []
    for patch in patches:
        spec = store[patch.hook].spec
        value = patch_value(store, patch.hook, patch.source, patch.label).to(device)
        hooks.append((patch.hook, _replace_tokens(spec, value, patch.tokens, head=patch.head)))
    return hooks


def run_patched(model, images: torch.Tensor, store, patches: Sequence[Patch]) -> torch.Tensor:
    """Logits [batch n_classes] of `images` with `patches` applied (inference mode, on the model's device).
    `store` is an :class:`ActivationStore` or an :class:`~vitlens.ActivationCache` (sources index its batch)."""
    store = _source(store, model)
    store.check_model(model)
    _check_layout(model, images, store, [store[patch.hook].spec for patch in patches])
    device = _device(model)
    with torch.inference_mode():
        return model.run_with_hooks(images.to(device), fwd_hooks=patch_hooks(store, patches, device))


def patch_sweep(model, images: torch.Tensor, store, hooks: str | Sequence[str], source,
                metric: Callable[[torch.Tensor], torch.Tensor], *, tokens: Sequence[int] | str = "all",
                label: int | None = None, head: int | None = None, batch_size: int = 64) -> pd.DataFrame:
    """Patch each hook at each token, one (hook, token) at a time, and measure `metric` on the logits.

    Args:
        images: [b chans h w], the run being patched (e.g. corrupted images).
        store: an :class:`ActivationStore` or an in-memory :class:`~vitlens.ActivationCache`.
        hooks: recorded hook names or glob patterns (``"blocks.*.hook_resid_pre"``).
        source: what to patch in (see :func:`patch_value`), e.g. the clean donor's sample index.
        metric: logits [b n_classes] -> [b] (e.g. ``lambda logits: logits[:, c]``) or a scalar; averaged over
            images. Any other shape raises.
        tokens: layout tokens to sweep: "all", a kind ("patches", ...) or indices; each must be stored.
        head: patch only this attention head (see :class:`Patch`).
        batch_size: images per forward: each forward runs ``batch_size // b`` token positions (at least one),
            a copy of the b images for each.

    Returns a DataFrame with one row per (hook, token): hook, layer, token, kind, name, row, col, metric.
    """
    store = _source(store, model)
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
            fn = _replace_tokens(spec, value, chosen.repeat_interleave(n_images), per_row=True, head=head)
            with torch.inference_mode():
                logits = model.run_with_hooks(tiled[:len(chosen) * n_images], fwd_hooks=[(hook, fn)])
            metrics += [_checked_metric(metric, part, n_images) for part in logits.view(len(chosen), n_images, -1)]
    sweep = pd.DataFrame({"hook": np.repeat(names, len(positions)), "token": positions.tolist() * len(names)})
    sweep.insert(1, "layer", pd.array([_layer(hook) for hook in sweep["hook"]], dtype="Int64"))
    return sweep.merge(token_table(layout), on="token", how="left").assign(metric=torch.stack(metrics).tolist())


def _checked_metric(metric: Callable, logits: torch.Tensor, n_images: int) -> torch.Tensor:
    """The metric's mean over images, refusing outputs that are neither [n_images] nor a scalar."""
    value = torch.as_tensor(metric(logits))
    if value.shape not in ((), (n_images,)):
        raise ValueError(f"metric returned shape {tuple(value.shape)} for logits {tuple(logits.shape)}; it must "
                         f"return one value per image ([{n_images}]) or a scalar, e.g. lambda logits: logits[:, c]")
    return value.float().mean()


def _check_layout(model, images: torch.Tensor, store, specs: Sequence[OutputSpec]) -> None:
    """Token positions only carry over between the source and `images` when their token grids agree."""
    if all(spec.token_axis is None for spec in specs):
        return
    layout = model.layout_for(images)
    if isinstance(store, CacheSource):
        for spec in specs:
            if spec.token_axis is not None and spec.tokens is None and spec.shape[spec.token_axis] != layout.n_tokens:
                raise StoreMismatchError(f"the images give {layout.n_tokens} tokens but the cache's {spec.name} has "
                                         f"{spec.shape[spec.token_axis]}; patch images of the cached size")
        return
    grid, recorded = layout.grid, store.layout.grid
    if grid != recorded:
        raise StoreMismatchError(f"the images give a {grid[0]}x{grid[1]} token grid but {store.path} was recorded on "
                                 f"a {recorded[0]}x{recorded[1]} grid; patch images of the size the store was "
                                 "recorded at")


def _head_axis(hook: str) -> int | None:
    """Per-sample axis of a hook's activation that runs over attention heads (None if it has none)."""
    if hook.endswith(("attn.hook_pattern", "attn.hook_attn_scores")):
        return 0
    if re.search(r"attn\.hook_(q|k|v|z|result|q_input|k_input|v_input|attn_in)$", hook):
        return 1
    return None


def _replace_tokens(spec: OutputSpec, value: torch.Tensor, positions, per_row: bool = False,
                    head: int | None = None) -> Callable:
    """A hook fn that writes `value` (stored shape, on the model's device) into the activation at layout token
    `positions` (and only at `head`, when given).

    `positions` None replaces the whole activation. With `per_row`, `positions` holds one token per row
    of the batch; otherwise every row is patched at all `positions`.
    """
    axis = spec.token_axis
    if head is not None:
        head_axis = _head_axis(spec.name)
        if head_axis is None:
            raise ValueError(f"{spec.name} has no head axis; head= applies to attn.hook_q/k/v/z/result, "
                             "hook_pattern and hook_attn_scores")
        if not 0 <= head < value.shape[head_axis]:
            raise ValueError(f"head={head} is out of range: {spec.name} has {value.shape[head_axis]} heads")
        value = value.select(head_axis, head)
        axis = None if axis is None else axis - (axis > head_axis)

        def select(activation):
            return activation.select(head_axis + 1, head)
    else:
        def select(activation):
            return activation
    if positions is None:
        if spec.tokens is not None:
            raise ValueError(f"{spec.name} was recorded at tokens {list(spec.tokens)} only, so it cannot be "
                             "patched whole; pass tokens= (some of those)")

        def patch_whole(activation, hook):
            patched = activation.clone()
            target = select(patched)
            target[...] = value.to(activation.dtype).expand_as(target)
            return patched

        return patch_whole
    if axis is None:
        raise ValueError(f"{spec.name} has no token axis; patch it whole (tokens=None)")
    positions = torch.as_tensor(positions, dtype=torch.long)
    n_tokens = value.shape[axis]
    if spec.tokens is None and len(positions) and not 0 <= int(positions.min()) <= int(positions.max()) < n_tokens:
        raise ValueError(f"tokens {sorted(set(positions.tolist()))} of {spec.name} are out of range: its token "
                         f"indices run 0..{n_tokens - 1}; pass layout indices (e.g. model.tokens('patches')), "
                         "not negative ones")
    stored = positions if spec.tokens is None else _stored_positions(spec, positions)
    rows_of_value = value.movedim(axis, 0)[stored.to(value.device)]  # [n positions, *other axes]
    index = positions.to(value.device)
    batch_rows = torch.arange(len(index), device=value.device) if per_row else slice(None)

    def hook_fn(activation, hook):
        patched = activation.clone()
        tokens_first = select(patched).movedim(axis + 1, 1)  # a view: writes land in `patched`
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


def _expand(store, hooks: str | Sequence[str]) -> list[str]:
    names = []
    for pattern in [hooks] if isinstance(hooks, str) else hooks:
        matched = fnmatch.filter([n for n, s in store.outputs.items() if s.hook], pattern)
        names += matched or [store[pattern].spec.name]  # store[...] raises, naming what is recorded
    return names


def _layer(hook: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------
# TransformerLens' sweeps on the token grid

# kind -> (TL activation name, TL patch setter, TL axis names); the TL function is get_act_patch_<kind>
_SWEEPS = {
    "resid_pre": ("resid_pre", tl_patching.layer_pos_patch_setter, ("layer", "pos")),
    "resid_mid": ("resid_mid", tl_patching.layer_pos_patch_setter, ("layer", "pos")),
    "attn_out": ("attn_out", tl_patching.layer_pos_patch_setter, ("layer", "pos")),
    "mlp_out": ("mlp_out", tl_patching.layer_pos_patch_setter, ("layer", "pos")),
    **{f"attn_head_{name}_by_pos": (act, tl_patching.layer_pos_head_vector_patch_setter, ("layer", "pos", "head"))
       for name, act in [("out", "z"), ("q", "q"), ("k", "k"), ("v", "v")]},
    **{f"attn_head_{name}_all_pos": (act, tl_patching.layer_head_vector_patch_setter, ("layer", "head"))
       for name, act in [("out", "z"), ("q", "q"), ("k", "k"), ("v", "v")]},
    "attn_head_pattern_all_pos": ("pattern", tl_patching.layer_head_pattern_patch_setter, ("layer", "head_index")),
    "attn_head_pattern_by_pos": ("pattern", tl_patching.layer_head_pos_pattern_patch_setter,
                                 ("layer", "head_index", "dest_pos")),
    "attn_head_pattern_dest_src_pos": ("pattern", tl_patching.layer_head_dest_src_pos_pattern_patch_setter,
                                       ("layer", "head_index", "dest_pos", "src_pos")),
}
_EVERY = {
    "block_every": ("resid_pre", "attn_out", "mlp_out"),
    "attn_head_all_pos_every": tuple(f"attn_head_{n}_all_pos" for n in ("out", "q", "k", "v", "pattern")),
    "attn_head_by_pos_every": tuple(f"attn_head_{n}_by_pos" for n in ("out", "q", "k", "v", "pattern")),
}
_ALIASES = {"attn_head_out": "attn_head_out_all_pos", **{
    short: f"attn_head_{short}_all_pos" for short in ("q", "k", "v", "pattern")}, **{
    f"{short}_by_pos": f"attn_head_{short}_by_pos" for short in ("q", "k", "v", "pattern")}}
KINDS = tuple(_SWEEPS) + tuple(_EVERY) + tuple(_ALIASES) + ("direct_path",)


def _kind(kind: str) -> str:
    kind = _ALIASES.get(kind, kind)
    if kind not in _SWEEPS and kind not in _EVERY and kind != "direct_path":
        raise ValueError(f"unknown patching kind {kind!r}; use one of {', '.join(KINDS)}")
    return kind


def patch_index(model, kind: str, images: torch.Tensor | None = None) -> pd.DataFrame:
    """The ``index_df`` for TransformerLens' ``generic_activation_patch`` for sweep `kind`, with every position
    axis over the token layout of `images` (the model's default size when None): one row per patch, columns
    TransformerLens' axis names, in the order of the ``[*axes]`` tensor ``act_patch`` returns."""
    kind = _kind(kind)
    if kind not in _SWEEPS:
        raise ValueError(f"patch_index covers single sweeps; {kind!r} is not one (see act_patch)")
    _, _, axes = _SWEEPS[kind]
    return tl_patching.make_df_from_ranges([_axis_size(model, axis, images) for axis in axes], list(axes))


def _axis_size(model, axis: str, images) -> int:
    if axis == "layer":
        return model.cfg.n_layers
    if axis in ("head", "head_index"):
        return model.cfg.n_heads
    return (model.layout if images is None else model.layout_for(images)).n_tokens


def act_patch(model, corrupted_images: torch.Tensor, clean_cache, metric: Callable[[torch.Tensor], torch.Tensor],
              kind: str, as_frame: bool = False, **kwargs):
    """TransformerLens' activation-patching sweep `kind` on images, with positions over the token layout.

    Runs ``transformer_lens.patching.generic_activation_patch`` with TransformerLens' own patch setter and an
    ``index_df`` from :func:`patch_index`, and reshapes its flat output to the tensor the matching
    ``get_act_patch_<kind>`` returns: [layer pos] for "resid_pre", "resid_mid", "attn_out", "mlp_out";
    [layer pos head] for "attn_head_{out,q,k,v}_by_pos"; [layer head] for "attn_head_{out,q,k,v,pattern}_all_pos"
    (also "attn_head_out", "q", "k", "v", "pattern"); [layer head dest_pos] for "attn_head_pattern_by_pos";
    [layer head dest_pos src_pos] for "attn_head_pattern_dest_src_pos"; [3 layer pos] for "block_every";
    [5 layer head] / [5 layer pos head] for "attn_head_all_pos_every" / "attn_head_by_pos_every". "direct_path"
    calls ``get_act_patch_direct_path`` (pass ``corrupted_cache``, ``src_layer``, ``src_head``, ``component``).

    Args:
        corrupted_images: [batch chans h w].
        clean_cache: ``model.run_with_cache(clean_images)[1]`` (same batch size, or 1, and image size).
        metric: logits [batch n_classes] -> a scalar (TransformerLens' convention).
        as_frame: return a DataFrame instead: one row per patch, the sweep's axes (layer, head, pos, dest_pos,
            src_pos; patch_type for the "every" kinds) plus, for each position axis, the token's kind, name,
            row and col on the grid, and the metric.
        kwargs: passed on to TransformerLens (``reduce``, ``baseline`` ...; they make it return a PatchingResult).
    """
    kind = _kind(kind)
    if kind == "direct_path":
        if as_frame:
            raise ValueError("as_frame applies to the position sweeps, not to kind='direct_path'")
        return tl_patching.get_act_patch_direct_path(model, corrupted_images, clean_cache,
                                                     patching_metric=metric, **kwargs)
    if kind in _EVERY:
        parts = [act_patch(model, corrupted_images, clean_cache, metric, sub, **kwargs) for sub in _EVERY[kind]]
        if kind == "attn_head_by_pos_every":
            parts[-1] = parts[-1].permute(0, 2, 1)  # pattern [layer head pos] -> [layer pos head], as TL does
        result = torch.stack(parts)
        if not as_frame:
            return result
        frames = [_frame(model, corrupted_images, sub, part.flatten()).assign(patch_type=i)
                  for i, (sub, part) in enumerate(zip(_EVERY[kind], parts))]
        return pd.concat(frames, ignore_index=True)
    activation, setter, axes = _SWEEPS[kind]
    index = patch_index(model, kind, corrupted_images)
    flat = tl_patching.generic_activation_patch(model, corrupted_images, clean_cache, metric, setter, activation,
                                                index_df=index, **kwargs)
    if not isinstance(flat, torch.Tensor):
        if as_frame:
            raise ValueError("as_frame needs the tensor result; drop reduce=/baseline= or use the PatchingResult")
        return flat
    if as_frame:
        return _frame(model, corrupted_images, kind, flat)
    return flat.reshape([_axis_size(model, axis, corrupted_images) for axis in axes])


def _frame(model, images, kind: str, flat: torch.Tensor) -> pd.DataFrame:
    """One row per patch of sweep `kind`: its axes, the grid position of each position axis, the metric."""
    activation, _, axes = _SWEEPS[kind]
    frame = patch_index(model, kind, images).rename(columns={"head_index": "head"})
    table = token_table(model.layout_for(images))
    for axis in [a for a in axes if a.endswith("pos")]:
        prefix = "" if axis == "pos" else axis.removesuffix("pos")
        renamed = table.drop(columns="token").add_prefix(prefix)
        frame = pd.concat([frame, renamed.iloc[frame[axis].to_numpy()].reset_index(drop=True)], axis=1)
    return frame.assign(activation=activation, metric=flat.detach().cpu().tolist())
