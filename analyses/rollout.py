"""Attention rollout, gradient attention rollout (vit-explain) and Chefer relevance (GAE), batched.

All three multiply per-layer token-mixing matrices built from the attention patterns ``A_l`` [batch head N N]
(read from ``blocks.{l}.attn.hook_pattern``, so timm's fused attention never hides them) and read the class
token's row over the patches as the map [batch grid_h grid_w]. Rollout (Abnar & Zuidema 2020, vit-explain's
variant) fuses the heads, discards the weakest entries and averages with the identity; gradient rollout
weights A by the target's gradient first; Chefer et al. (ICCV 2021, the generic rule) adds
``mean_h((dA * A)+) R`` to R per layer. The defaults are the corrected methods; ``compat=True``
reproduces jacobgil/vit-explain's numbers quirk for quirk (see ``specs/rollout_and_vit_cx.md`` §1.6), each image of
a batch getting what the original gives it alone. Every token layout works: CLS first, then distillation
and register tokens (they take part in the products but are not in the map), then the patches of any grid.
"""
from __future__ import annotations

from typing import Sequence

import torch

from analyses.explain import register, resolve_target

HEAD_FUSIONS = ("mean", "max", "min")
CLAMPS = ("after", "before")
GRADIENTS = ("probs", "scores")


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """[batch head q k] -> [batch q k]: mean, elementwise max or elementwise min over the heads."""
    if head_fusion == "mean":
        return attention.mean(1)
    if head_fusion == "max":
        return attention.amax(1)
    if head_fusion == "min":
        return attention.amin(1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_lowest(fused: torch.Tensor, ratio: float, protect: str | None = "cls", cls_index: int | None = 0) -> torch.Tensor:
    """Zero the ``floor(N*N*ratio)`` smallest entries of each image's [N N] matrix (a copy of [batch N N]).

    The selection is global over the matrix, as in vit-explain. `protect` keeps entries out of it:
    ``"cls"`` every token's attention to the class token (column `cls_index`; at most the unprotected entries
    are discarded), ``"origin"`` vit-explain's rollout (the smallest entries are chosen among all N*N and entry
    (0, 0) is then spared, so one fewer may be zeroed), None nothing (vit-explain's gradient rollout).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {ratio}")
    batch, n, _ = fused.shape
    flat = fused.reshape(batch, n * n)
    k = int(n * n * ratio)
    candidates = flat
    if protect == "cls":
        if cls_index is None:
            raise ValueError("protect='cls' needs a class token; pass protect=None")
        k = min(k, n * n - n)
        candidates = flat.clone()
        candidates.view(batch, n, n)[:, :, cls_index] = float("inf")
    elif protect not in ("origin", None):
        raise ValueError(f"protect must be 'cls', 'origin' or None, got {protect!r}")
    if k == 0:
        return fused.clone()
    drop = torch.zeros_like(flat, dtype=torch.bool)
    drop.scatter_(1, candidates.topk(k, dim=-1, largest=False).indices, True)
    if protect == "origin":
        drop[:, 0] = False
    return flat.masked_fill(drop, 0).reshape(batch, n, n)


def rollout_step(rolled: torch.Tensor | None, fused: torch.Tensor, *, compat: bool = False) -> torch.Tensor:
    """One layer: ``a = (F + I) / 2``, row-normalised, then ``a @ rolled`` ([batch N N]; None = identity).

    compat: vit-explain divides by ``a.sum(-1)`` without keepdim, so entry (i, j) is divided by the sum of
    *row j*; the default divides each row by its own sum (row-stochastic).
    """
    n = fused.shape[-1]
    a = (fused + torch.eye(n, dtype=fused.dtype, device=fused.device)) / 2
    a = a / (a.sum(-1)[:, None, :] if compat else a.sum(-1, keepdim=True))
    return a if rolled is None else a @ rolled


def rollout(attentions: Sequence[torch.Tensor], *, head_fusion: str = "mean", discard_ratio: float = 0.9,
            protect_cls: bool = True, cls_index: int | None = 0, compat: bool = False) -> torch.Tensor:
    """Attention rollout of patterns ``[batch head N N]`` in forward layer order -> [batch N N].

    ``R = a_{L-1} ... a_0`` with ``a_l = rownorm((discard(fuse(A_l)) + I) / 2)``. compat: vit-explain's
    normalisation (see :func:`rollout_step`) and discard (only entry (0, 0) spared; `protect_cls` ignored).
    """
    rolled = None
    protect = "origin" if compat else ("cls" if protect_cls else None)
    for attention in attentions:
        fused = discard_lowest(fuse_heads(attention, head_fusion), discard_ratio, protect, cls_index)
        rolled = rollout_step(rolled, fused, compat=compat)
    return rolled


def gradient_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], *,
                     discard_ratio: float = 0.9, head_fusion: str = "mean", clamp: str = "after",
                     protect_cls: bool = True, cls_index: int | None = 0, compat: bool = False) -> torch.Tensor:
    """Gradient attention rollout -> [batch N N]: rollout of ``fuse(A ⊙ G)`` clamped at 0.

    Args:
        attentions, gradients: [batch head N N] per layer, both in forward layer order; the gradient of the
            target's logit with respect to the attention probabilities (or the pre-softmax scores).
        clamp: ``"after"`` the head fusion (vit-explain) or ``"before"`` it (as Chefer et al.).
        compat: vit-explain's pairing of attention l with gradient L-1-l (its backward hooks fire last layer
            first), its normalisation and its discard with nothing spared (`protect_cls` ignored).
    """
    if clamp not in CLAMPS:
        raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
    if len(attentions) != len(gradients):
        raise ValueError(f"{len(attentions)} attention patterns but {len(gradients)} gradients")
    gradients = list(gradients)[::-1] if compat else gradients
    protect = None if compat or not protect_cls else "cls"
    rolled = None
    for attention, gradient in zip(attentions, gradients):
        weighted = attention * gradient
        if clamp == "before":
            fused = fuse_heads(weighted.clamp_min(0), head_fusion)
        else:  # vit-explain sets negatives to 0 after the fusion
            fused = fuse_heads(weighted, head_fusion).clamp_min(0)
        rolled = rollout_step(rolled, discard_lowest(fused, discard_ratio, protect, cls_index), compat=compat)
    return rolled


def chefer_relevance(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], *,
                     start_layer: int = 0) -> torch.Tensor:
    """Chefer et al.'s generic relevance (Transformer-MM-Explainability) -> [batch N N].

    ``R = I``; for each layer from `start_layer` on: ``R <- R + mean_h((G ⊙ A)+) @ R``, with G the gradient
    of the target's logit with respect to the attention probabilities A. No row normalisation (equivalent
    to ``prod(I + Ā_l)``; for self-attention it does not change the class token's row, per the authors).
    """
    if not 0 <= start_layer < max(len(attentions), 1):
        raise ValueError(f"start_layer must lie in [0, {len(attentions)}), got {start_layer}")
    batch, _, n, _ = attentions[0].shape
    relevance = torch.eye(n, dtype=attentions[0].dtype, device=attentions[0].device).expand(batch, n, n)
    for attention, gradient in list(zip(attentions, gradients))[start_layer:]:
        relevance = relevance + (gradient * attention).clamp_min(0).mean(1) @ relevance
    return relevance


def cls_map(rolled: torch.Tensor, layout, compat: bool = False) -> torch.Tensor:
    """The class token's row over the patches, [batch N N] -> [batch grid_h grid_w].

    compat: divided by each map's maximum, as vit-explain returns it (no epsilon).
    """
    rows, cols = layout.grid
    maps = rolled[:, layout.cls_index, layout.n_prefix:].reshape(len(rolled), rows, cols)
    return maps / maps.amax(dim=(1, 2), keepdim=True) if compat else maps


# ---------------------------------------------------------------------------------------------------------
# Over a model


def _check_class_token(model, method: str) -> None:
    if model.layout.cls_index is None:
        raise ValueError(f"{method} reads the class token's row of the rolled-out attention, but this model has no "
                         f"class token (global_pool={model.cfg.global_pool!r}); explain it with vit_cx instead")


def _compat_override(compat: bool, **given) -> None:
    """With compat=True the original's fixed settings apply: an option that was set explicitly is an error."""
    if compat:
        set_ = [k for k, v in given.items() if v is not None]
        if set_:
            raise ValueError(f"compat=True reproduces vit-explain, which fixes {', '.join(set_)}; "
                             f"drop {' and '.join(set_)} or use compat=False")


def _patterns_and_gradients(model, images: torch.Tensor, target, wrt: str):
    """One forward with grad and one backward: (patterns, gradients, target), patterns [batch head N N] per
    layer in forward order, the gradients of the target's summed logits w.r.t. the patterns ("probs") or
    the pre-softmax scores ("scores")."""
    if wrt not in GRADIENTS:
        raise ValueError(f"wrt must be one of {GRADIENTS}, got {wrt!r}")
    saved = {"hook_pattern": [], "hook_attn_scores": []}
    wanted = ("hook_pattern", "hook_attn_scores") if wrt == "scores" else ("hook_pattern",)

    def save(activation, hook):
        saved[hook.name.rsplit(".", 1)[1]].append(activation)

    names = lambda name: name.endswith(tuple(f"attn.{w}" for w in wanted))  # noqa: E731
    # the images as a leaf that needs grad: the patterns are then in the graph even with frozen weights
    leaf = images.detach().clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad(), model.hooks(fwd_hooks=[(names, save)]):
        logits = model(leaf)
        target = resolve_target(target, len(images), logits.shape[-1], images.device, logits)
        inputs = saved["hook_attn_scores" if wrt == "scores" else "hook_pattern"]
        gradients = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), inputs)
    return [p.detach() for p in saved["hook_pattern"]], gradients


@register("rollout", options={"head_fusion": "mean", "discard_ratio": 0.9, "protect_cls": None},
          description="attention rollout: product of head-fused, discarded, identity-averaged attention",
          paper="Abnar & Zuidema 2020; jacobgil/vit-explain", own_target=True)
def attention_rollout(model, images: torch.Tensor, target=None, *, compat: bool = False, head_fusion: str = "mean",
                      discard_ratio: float = 0.9, protect_cls: bool | None = None) -> torch.Tensor:
    """Attention rollout maps [batch grid_h grid_w] (class-agnostic: `target` is not used).

    Streams over the layers inside the forward's hooks, so only one [batch N N] product is held.
    protect_cls (default True): never discard attention to the class token. compat: vit-explain's
    ``VITAttentionRollout``: row-j normalisation, only (0, 0) spared, maps divided by their max
    (`protect_cls` is fixed then). Differences from compat: keepdim row normalisation, CLS column protected,
    raw CLS-row values; discard per image instead of on batch item 0 only.
    """
    _check_class_token(model, "rollout")
    _compat_override(compat, protect_cls=protect_cls)
    fuse_heads(images.new_zeros(1, 1, 1, 1), head_fusion)  # a bad name raises before the forward
    protect = "origin" if compat else ("cls" if protect_cls in (None, True) else None)
    layout = model.layout_for(images)
    state = {"rolled": None}

    def step(pattern, hook):
        fused = discard_lowest(fuse_heads(pattern, head_fusion), discard_ratio, protect, layout.cls_index)
        state["rolled"] = rollout_step(state["rolled"], fused, compat=compat)

    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), step)]):
        model(images)
    return cls_map(state["rolled"], layout, compat)


@register("grad_rollout", options={"discard_ratio": 0.9, "head_fusion": None, "wrt": None, "clamp": None,
                                   "protect_cls": None},
          needs_grad=True, description="gradient attention rollout: rollout of the gradient-weighted attention",
          paper="jacobgil/vit-explain", own_target=True)
def grad_rollout(model, images: torch.Tensor, target=None, *, compat: bool = False, discard_ratio: float = 0.9,
                 head_fusion: str | None = None, wrt: str | None = None, clamp: str | None = None,
                 protect_cls: bool | None = None) -> torch.Tensor:
    """Gradient attention rollout maps [batch grid_h grid_w] of the target class's logit.

    Defaults: ``head_fusion="mean"``, gradients w.r.t. the attention probabilities (``wrt="probs"``; or
    ``"scores"``, pre-softmax), ``clamp="after"`` the fusion (or ``"before"``), CLS column protected, layers
    paired in forward order, keepdim normalisation, raw values. compat: vit-explain's
    ``VITAttentionGradRollout`` on its first call: gradients w.r.t. the scores paired in reversed layer order,
    clamp after the mean, nothing spared from the discard, row-j normalisation, maps divided by their max
    (the four options are fixed then). Its state carried between calls (quirk 7) is not reproduced.
    """
    _check_class_token(model, "grad_rollout")
    _compat_override(compat, head_fusion=head_fusion, wrt=wrt, clamp=clamp, protect_cls=protect_cls)
    head_fusion, clamp = head_fusion or "mean", clamp or "after"
    fuse_heads(images.new_zeros(1, 1, 1, 1), head_fusion)
    if clamp not in CLAMPS:
        raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
    patterns, gradients = _patterns_and_gradients(model, images, target, "scores" if compat else wrt or "probs")
    layout = model.layout_for(images)
    rolled = gradient_rollout(patterns, gradients, discard_ratio=discard_ratio, head_fusion=head_fusion, clamp=clamp,
                              protect_cls=protect_cls in (None, True), cls_index=layout.cls_index, compat=compat)
    return cls_map(rolled, layout, compat)


@register("chefer", options={"start_layer": 0}, needs_grad=True,
          description="Chefer relevance (GAE): R += mean_h((dA * A)+) R",
          paper="Chefer, Gur & Wolf, ICCV 2021 (Transformer-MM-Explainability)", own_target=True)
def chefer(model, images: torch.Tensor, target=None, *, compat: bool = False, start_layer: int = 0) -> torch.Tensor:
    """Chefer relevance maps [batch grid_h grid_w]: the class token's row of :func:`chefer_relevance`.

    The gradients are those of the target's logit w.r.t. the attention probabilities, in forward order.
    The original has no quirk to reproduce (its notebooks min-max the map only for display): compat=True
    gives the same maps.
    """
    _check_class_token(model, "chefer")
    patterns, gradients = _patterns_and_gradients(model, images, target, "probs")
    return cls_map(chefer_relevance(patterns, gradients, start_layer=start_layer), model.layout_for(images))
