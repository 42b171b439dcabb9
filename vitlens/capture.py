"""What a recording captures: hooks at token selections, :class:`Reducer` s and :class:`Computation` s.

:func:`resolve_hooks` turns hook names (glob patterns allowed) and token selections into the token indices
to keep, checked against the model; :class:`_Capture` runs one batch through the model in eval and inference
mode with forward hooks that keep those tokens (checking that the token axis is where the layout says) and
the reducers' summaries, then the computations (which may need autograd). The recorder
(:mod:`vitlens.recorder`) writes what it returns into the store.
"""
from __future__ import annotations

import fnmatch
import inspect
from contextlib import nullcontext
from typing import Mapping, Sequence

import torch

from vitlens.hooked import UnknownHookError

_NO_TOKEN_AXIS = ("hook_embed", "hook_pooled", "hook_logits")  # patches only, or pooled: no layout axis


class Reducer:
    """Summarises activations on the device during the forward; the store keeps only the summary.

    A reducer reads the hooks listed by :meth:`hooks` and turns each activation ``[batch, ...]`` into
    ``[batch, *per_hook]`` in :meth:`reduce` (inside the hook, so the activation is freed right away). The
    stored output, named :attr:`name`, stacks the hooks: ``[n_samples, n_hooks, *per_hook]`` of :attr:`dtype`,
    which :meth:`shape` declares (without the sample axis).
    """

    name: str
    dtype: str

    def hooks(self, model) -> list[str]:
        raise NotImplementedError

    def shape(self, model) -> tuple[int, ...]:
        raise NotImplementedError

    def reduce(self, model, activation: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """What the store's metadata records about the reducer (its class and settings)."""
        return {"class": type(self).__name__, **vars(self)}


class Computation:
    """A per-image result computed from each batch, outside the hooked forward: explanation maps (which
    need autograd), faithfulness scores, anything that is not a reduction of one hook.

    :meth:`compute` gets the model, the batch's images ``[batch C H W]`` and labels ``[batch]`` on the device
    (and, if it accepts a ``batch`` keyword, the batch's other item fields collated, e.g. ``token_mask``
    ``[batch grid_h grid_w]``) and returns ``[batch, *shape]``, which the store keeps under :attr:`name` as
    :attr:`dtype`. It runs under the recording's autocast, in inference mode unless :attr:`needs_grad`.
    """

    name: str
    dtype: str
    needs_grad: bool = False

    def shape(self, model) -> tuple[int, ...]:
        raise NotImplementedError

    def compute(self, model, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """What the store's metadata records about the computation (its class and settings)."""
        return {"class": type(self).__name__, **vars(self)}

    @property
    def wants_batch(self) -> bool:
        """Whether :meth:`compute` takes the collated extra item fields (a ``batch`` or ``**`` keyword)."""
        parameters = inspect.signature(self.compute).parameters.values()
        return any(p.name == "batch" or p.kind is p.VAR_KEYWORD for p in parameters)


def token_axis(hook: str) -> int | None:
    """Per-sample axis of a hook's activation that runs over the token layout (None if it has none).

    Attention scores and patterns [head query key] select queries (as TransformerLens' ``pos_slice``).
    """
    if hook.endswith(("hook_attn_scores", "hook_pattern")):
        return 1
    return None if hook in _NO_TOKEN_AXIS else 0


def resolve_hooks(model, hooks, tokens: str | Sequence[int] = "all") -> dict[str, list[int] | None]:
    """Hook names (glob patterns allowed) -> token indices to keep (None = all), checked against the model.

    `hooks` is a name, a list of names (all recorded with `tokens`) or a mapping name -> selection. A
    selection is "all", a token kind ("cls", "registers", "prefix", "patches", ...) or a list of indices.
    """
    if isinstance(hooks, str):
        hooks = [hooks]
    if isinstance(hooks, Mapping) and not (isinstance(tokens, str) and tokens == "all"):
        raise ValueError(f"tokens={tokens!r} applies only to hooks given as names; with a mapping of hooks, give "
                         "each hook its token selection in the mapping")
    requested = hooks.items() if isinstance(hooks, Mapping) else [(name, tokens) for name in hooks]
    resolved = {}
    for pattern, selection in requested:
        for name in expand_hook(model, pattern):
            resolved[name] = _resolve_tokens(model, name, selection)
    return resolved


def expand_hook(model, pattern: str) -> list[str]:
    """The hook names matching `pattern` (a name or a glob); raises UnknownHookError naming close hooks."""
    if not any(c in pattern for c in "*?["):
        model.hook_dict[pattern]  # raises UnknownHookError naming the closest hooks
        return [pattern]
    names = fnmatch.filter(model.hook_dict, pattern)
    if not names:
        raise UnknownHookError(f"no hook matches {pattern!r}; model.hook_dict lists all hook names")
    return names


def _resolve_tokens(model, hook: str, selection) -> list[int] | None:
    if isinstance(selection, str) and selection == "all":
        return None
    if token_axis(hook) is None:
        raise ValueError(f"{hook} has no token axis of the model's layout; record it with tokens='all'")
    indices = model.tokens(selection) if isinstance(selection, str) else torch.as_tensor(selection)
    indices = sorted({int(i) for i in indices.flatten()})
    n = model.layout.n_tokens
    if not indices or not 0 <= indices[0] <= indices[-1] < n:
        raise ValueError(f"token selection {selection!r} of {hook} must be non-empty indices in [0, {n})")
    return indices


class _Capture:
    """Forward hooks that keep the selected tokens of each hook and the reducer results of one batch."""

    def __init__(self, model, hooks: dict[str, list[int] | None], reducers: Sequence[Reducer], dtype: str,
                 autocast: torch.dtype | None, device: torch.device, computations: Sequence[Computation] = ()):
        self.model, self.dtype, self.autocast = model, getattr(torch, dtype), autocast
        self.hooks, self.reducers, self.computations = hooks, list(reducers), list(computations)
        # on the device once: a copy from pageable memory in every hook call would synchronise the GPU
        self._token_index = {name: torch.tensor(t, device=device) for name, t in hooks.items() if t is not None}
        self.batched = {c.name for c in self.computations if c.wants_batch}  # those given the item fields

    def run(self, images: torch.Tensor, labels: torch.Tensor, extras: dict | None = None) -> dict[str, torch.Tensor]:
        """Forward one batch (eval and inference mode), then run the computations (with `extras`, the
        collated other item fields); returns ``{output name: tensor [batch, *shape]}``."""
        outputs = self._forward(images, labels) if self.hooks or self.reducers else {}
        for computation in self.computations:
            kwargs = {"batch": extras or {}} if computation.name in self.batched else {}
            grad = torch.inference_mode(False) if computation.needs_grad else torch.inference_mode()
            with grad, torch.set_grad_enabled(computation.needs_grad), self._amp(images):
                result = computation.compute(self.model, images, labels, **kwargs)
            if not isinstance(result, torch.Tensor) or result.shape[:1] != images.shape[:1]:
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise ValueError(f"computation {computation.name} returned {got}; it must return a tensor "
                                 f"[batch={len(images)}, *shape]")
            outputs[computation.name] = result.detach().to(getattr(torch, computation.dtype))
        return outputs

    def _amp(self, images: torch.Tensor):
        """The recording's autocast on the images' device (a null context without one)."""
        return torch.autocast(images.device.type, dtype=self.autocast) if self.autocast else nullcontext()

    def _forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs, parts = {}, {r.name: [] for r in self.reducers}
        n_tokens = self.model.layout_for(images).n_tokens

        def keep(activation, hook):
            axis = token_axis(hook.name)
            if axis is not None and activation.shape[axis + 1] != n_tokens:
                raise ValueError(f"{hook.name} has shape {tuple(activation.shape)}: axis {axis + 1} is not the "
                                 f"token axis ({n_tokens} tokens)")
            index = self._token_index.get(hook.name)
            if index is not None:
                activation = activation.index_select(axis + 1, index)
            outputs[hook.name] = activation.to(self.dtype)

        def reducing(reducer):
            def hook_fn(activation, hook):
                parts[reducer.name].append(reducer.reduce(self.model, activation, labels))
            return hook_fn

        fwd_hooks = [(name, keep) for name in self.hooks]
        fwd_hooks += [(name, reducing(r)) for r in self.reducers for name in r.hooks(self.model)]
        with torch.inference_mode(), self._amp(images):
            self.model.run_with_hooks(images, fwd_hooks=fwd_hooks)
        for reducer in self.reducers:
            outputs[reducer.name] = torch.stack(parts[reducer.name], dim=1).to(getattr(torch, reducer.dtype))
        return outputs
