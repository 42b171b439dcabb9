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

from typing import Callable, Sequence

import torch

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

    This is the token perturbation of vit-cls_emb (§A7, their ``tokens_mask``): a hook on ``hook_full_embed``
    gathers the kept tokens, so the blocks see a shorter sequence (in layout order, prefix tokens first)
    and the dropped tokens take no part in attention at all. The head then pools what is left: CLS for
    CLS-pooling models, the mean of the kept patches for average-pooling ones.

    Args:
        model: a :class:`~vitlens.HookedViT`.
        images: [batch chans height width], preprocessed.
        keep: bool [batch tokens] (True = keep, the model's token layout: ``model.layout``) or int token
            indices [batch n_keep] (the same count for every image). Images that keep different numbers of
            tokens are run in groups of equal count (one forward per group).
        fwd_hooks: extra TransformerLens ``(name, fn)`` hooks for the same forward (e.g. from
            :func:`attention_hooks`). They see the shortened sequence: position i is the i-th kept token,
            and the prefix tokens keep their positions (0 = CLS).
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
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits = resid = None
    for count in counts.unique().tolist():
        rows = (counts == count).nonzero().squeeze(1).to(images.device)
        index = torch.stack([indices[i] for i in rows.tolist()])  # [group n_keep]
        gathered = {}

        def gather(x, hook, index=index):
            return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))

        def keep_last(x, hook):
            gathered["resid"] = x

        hooks = [("hook_full_embed", gather), *fwd_hooks] + ([(last, keep_last)] if return_resid else [])
        out = model.run_with_hooks(images[rows], fwd_hooks=hooks)
        if logits is None:
            logits = out.new_empty(len(images), out.shape[-1])
        logits = logits.index_copy(0, rows, out)
        if return_resid:
            part = gathered["resid"]
            if resid is None:
                n_tokens = model.layout_for(images).n_tokens
                resid = part.new_full((len(images), n_tokens, part.shape[-1]), float("nan"))
            full = part.new_full((len(rows), resid.shape[1], part.shape[-1]), float("nan"))
            full = full.scatter(1, index[:, :, None].expand(-1, -1, part.shape[-1]), part)
            resid = resid.index_copy(0, rows, full)
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
