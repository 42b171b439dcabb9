"""ActivationCache: TransformerLens' cache, made right for timm ViTs.

TransformerLens' helpers assume a language model: the embedding is ``hook_embed + hook_pos_embed``, the
final LayerNorm acts per token, one unembedding reads one position, and ``cfg.normalization_type`` says
which norm every residual read goes through. None of these holds for every ViT family, and where they fail
TransformerLens returns wrong numbers rather than an error. This subclass makes each helper either exact on
every family HookedViT supports or raise a clear error:

* the embedding component is ``hook_full_embed`` (patches + prefix tokens + position embedding + ``norm_pre``;
  ``hook_embed`` holds the patches only), labelled "embed", in ``decompose_resid`` and
  ``get_full_resid_decomposition`` (which TransformerLens would leave out);
* ``apply_ln`` (and ``logit_attrs``, ``accumulated_resid(apply_ln=True)``, ...) applies the LayerNorm that really
  reads that point: ``ln1``/``ln2`` at block inputs (also on average-pool models), the final ``norm`` after the
  last block; it raises on average-pool models at the final layer (``fc_norm`` acts after pooling), at the
  inputs of post-norm blocks, and for norms other than LayerNorm;
* DeiT-distilled logits are the mean of ``head(CLS)`` and ``head_dist(dist)``: ``logit_attrs`` attributes through
  both heads exactly (the stack must keep the position axis) and ``logit_lens`` refuses;
* ``apply_slice_to_batch_dim`` returns this class, and the alias names ``blocks.{l}.hook_q_input`` (``k_input``,
  ``v_input``, ``attn_in``) read ``blocks.{l}.attn.hook_q_input`` etc.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from transformer_lens import ActivationCache as _TLActivationCache
from transformer_lens.utilities import Slice, get_act_name

_ALIAS = re.compile(r"^blocks\.(\d+)\.hook_(q_input|k_input|v_input|attn_in)$")


def canonical_hook_name(name: str) -> str:
    """TransformerLens' block-level names of the split-qkv hooks (``blocks.{l}.hook_q_input``, what
    ``get_act_name("q_input", l)`` gives) -> where HookedViT keeps them (``blocks.{l}.attn.hook_q_input``)."""
    return _ALIAS.sub(r"blocks.\1.attn.hook_\2", name) if isinstance(name, str) else name


class ActivationCache(_TLActivationCache):
    """TransformerLens ``ActivationCache`` for a :class:`~vitlens.HookedViT` (see the module docstring)."""

    def __init__(self, cache_dict, model, has_batch_dim: bool = True):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.has_embed = False  # hook_embed is patches only; the embedding component is hook_full_embed
        self.has_pos_embed = False  # ... which already holds the position embedding

    def __getitem__(self, key) -> torch.Tensor:
        try:
            return super().__getitem__(key)
        except KeyError:
            if isinstance(key, str):
                name = key if "." in key or key.startswith("hook_") else get_act_name(key)
            else:
                layer = key[1] + self.model.cfg.n_layers if len(key) > 1 and key[1] is not None and key[1] < 0 \
                    else (key[1] if len(key) > 1 else None)
                name = get_act_name(key[0], layer, *key[2:])
            if canonical_hook_name(name) in self.cache_dict:
                return self.cache_dict[canonical_hook_name(name)]
            raise

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return ActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    # -- which norm reads a point of the residual stream -----------------------------------------------------

    def _norm_at(self, layer, mlp_input: bool) -> nn.Module:
        """The norm that reads the residual stream at the input of block `layer` (the final norm for None, -1
        or n_layers); raises where no per-token norm reads it."""
        model = self.model
        if layer is None or layer in (-1, model.cfg.n_layers):
            vit = model.vit
            if isinstance(vit.norm, nn.Identity) and not isinstance(vit.fc_norm, nn.Identity):
                raise ValueError(
                    "This model has no per-token final LayerNorm to apply: it average-pools the tokens and then "
                    "applies fc_norm to the pooled vector. Use model.unembed(resid) for a per-token class projection."
                )
            return vit.norm
        if model.blocks[layer].post_norm:
            raise ValueError(
                "This model has post-norm (ResPostBlock) blocks: their LayerNorms act on sublayer outputs, not on "
                "the residual stream, so there is no block-input LayerNorm to apply. Use apply_ln=False."
            )
        block = model.vit.blocks[layer]
        return block.norm2 if mlp_input else block.norm1

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None,
                          has_batch_dim=True, recompute_ln=False):
        """TransformerLens' ``apply_ln_to_stack`` (also behind ``apply_ln=True`` and ``logit_attrs``) with the
        norm that really reads that point: centre and divide by the cached scale (no affine, as in
        TransformerLens); identity where no norm reads it; an error where no per-token LayerNorm does."""
        norm = self._norm_at(layer, mlp_input)
        if isinstance(norm, nn.Identity):
            return Slice(batch_slice).apply(residual_stack, dim=1) if has_batch_dim else residual_stack
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"apply_ln supports LayerNorm only; this model reads that point with a "
                             f"{type(norm).__name__}. Use apply_ln=False.")
        return super().apply_ln_to_stack(residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim,
                                         recompute_ln)

    def _get_cached_ln_scale(self, layer, mlp_input, pos_slice, batch_slice=None):
        norm = self._norm_at(layer, mlp_input)
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"apply_ln supports LayerNorm only; this model reads that point with a "
                             f"{type(norm).__name__}. Use apply_ln=False.")
        return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)

    # -- decompositions --------------------------------------------------------------------------------------

    def _embed(self, pos_slice) -> torch.Tensor:
        """[1 *batch_and_pos d_model]: the embedding component (hook_full_embed)."""
        return Slice(pos_slice).apply(self["hook_full_embed"], dim=-2)[None]

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None,
                        incl_embeds=True, return_labels=False):
        """The residual stream into ``layer`` as [component batch pos d_model]: embed, then every attention
        and MLP output. Same arguments and labels as TransformerLens."""
        parts, labels = super().decompose_resid(layer, mlp_input, mode, apply_ln=False, pos_slice=pos_slice,
                                                incl_embeds=False, return_labels=True)
        if incl_embeds:
            parts, labels = torch.cat([self._embed(pos_slice), parts]), ["embed", *labels]
        if apply_ln:
            parts = self.apply_ln_to_stack(parts, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (parts, labels) if return_labels else parts

    def get_full_resid_decomposition(self, layer=None, mlp_input=False, expand_neurons=True, apply_ln=False,
                                     pos_slice=None, return_labels=False, project_output_onto=None):
        """TransformerLens' full decomposition (heads, neurons or MLP outputs, bias) plus the "embed" component
        (``hook_full_embed``, placed before "bias"), so that the components sum to the residual stream."""
        stack, labels = super().get_full_resid_decomposition(layer, mlp_input, expand_neurons, apply_ln, pos_slice,
                                                             True, project_output_onto)
        embed = self._embed(pos_slice)
        if apply_ln:
            embed = self.apply_ln_to_stack(embed, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if project_output_onto is not None:
            embed = embed @ project_output_onto
        stack = torch.cat([stack[:-1], embed.to(stack.dtype), stack[-1:]])
        labels = [*labels[:-1], "embed", labels[-1]]
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer=-1, return_labels=False, incl_remainder=False, pos_slice=None,
                           apply_ln=False):
        if layer == 0 and not incl_remainder:  # TransformerLens shapes the empty stack from hook_embed (patches only)
            empty = self._embed(pos_slice)[:0]
            return (empty, []) if return_labels else empty
        return super().stack_head_results(layer, return_labels, incl_remainder, pos_slice, apply_ln)

    # -- logits -----------------------------------------------------------------------------------------------

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                    has_batch_dim=True):
        """TransformerLens' direct logit attribution: [component *batch_and_pos].

        The attributions sum to ``logit - model.logit_bias(tokens)``. On DeiT-distilled models the logit is the
        mean of ``head(CLS)`` and ``head_dist(dist)``, so the stack must keep its position axis (``pos_slice=None``);
        the result is then [component *batch], each component's share through both heads.
        """
        model = self.model
        heads = model.heads()
        if len(heads) == 1:
            return super().logit_attrs(residual_stack, tokens, incorrect_tokens, pos_slice, batch_slice, has_batch_dim)
        if pos_slice is not None or residual_stack.shape[-2] <= model.layout.dist_index:
            raise ValueError("DeiT-distilled logits read two tokens (CLS through head, dist through head_dist): pass "
                             "a residual stack over all positions and pos_slice=None; the result is [component batch].")
        scaled = self.apply_ln_to_stack(residual_stack, -1, batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        attrs = 0
        for head, token in zip(heads, (model.layout.cls_index, model.layout.dist_index)):
            directions = model.class_directions(tokens, head)
            if incorrect_tokens is not None:
                directions = directions - model.class_directions(incorrect_tokens, head)
            attrs = attrs + (scaled[..., token, :] * directions).sum(-1)
        return attrs / len(heads)

    def logit_lens(self, **kwargs):
        """TransformerLens 4.3's one-call logit lens, read at the class token by default (``positions=``
        overrides). Refused on DeiT-distilled models (two heads) and, through ``apply_ln``, on average-pool
        models (their final norm acts after pooling); ``apply_ln=False`` reads the raw stream."""
        model = self.model
        if len(model.heads()) > 1:
            raise ValueError("logit_lens reads one token through one head, but DeiT-distilled logits average two "
                             "heads on two tokens; use cache.logit_attrs or model.unembed per token instead.")
        if "positions" not in kwargs:
            if model.layout.cls_index is None:
                raise ValueError("This model has no class token; pass positions= (token indices) to logit_lens.")
            kwargs["positions"] = model.layout.cls_index
        return super().logit_lens(**kwargs)
