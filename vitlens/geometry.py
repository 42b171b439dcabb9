"""Weight geometry of a hooked timm ViT, in TransformerLens' names and shapes.

Every quantity is a property computed from the timm weights on each access (views where the layout
allows, so in-place edits of the timm model show up at once; nothing is copied into the wrapper).
LayerNorms stay unfolded: ``q = ln1.hook_normalized @ W_Q + b_Q`` (before qk-norm, which acts on q and k
afterwards; in post-norm blocks, which normalise the sublayer output instead, ``q = hook_resid_pre @ W_Q +
b_Q``), and the block's LayerScale is folded into the output weights (``W_O``, ``b_O``, ``W_out``, ``b_out``)
so that ``z @ W_O + b_O`` is exactly what the block adds to the residual stream. Where a quantity
is undefined for a model (``QK`` under qk-norm, output weights of post-norm blocks, a gated or normed
attention output) the property raises and says why.

Per block: ``attn.W_Q/W_K/W_V`` [head d_model d_head], ``attn.b_Q/b_K/b_V`` [head d_head], ``attn.W_O``
[head d_head d_model], ``attn.b_O`` [d_model], ``attn.QK``/``attn.OV`` (``FactoredMatrix`` [head d_model
d_model]), ``mlp.W_in`` [d_model d_mlp], ``mlp.b_in``, ``mlp.W_out`` [d_mlp d_model], ``mlp.b_out``,
``ln1.w``/``ln1.b`` [d_model]. On the model: the same stacked over layers (``model.W_Q`` [layer head d_model
d_head], ...), ``W_E`` [chans*patch_h*patch_w d_model] (the patch embedding as a matrix over flattened
(chan, row, col) patch pixels), ``b_E``, ``W_pos`` [pos_embed_tokens d_model], ``W_U`` [d_model n_classes],
``b_U``, and the class-embedding helpers TransformerLens' ``ActivationCache`` calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformer_lens.FactoredMatrix import FactoredMatrix
from timm.layers import LayerScale


def _bias(layer: nn.Module) -> torch.Tensor:
    """A Linear's or Conv's bias, or zeros (one per output unit) in its weight's dtype and device when it has none."""
    return layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.weight.shape[0])


class _Wrapper(nn.Module):
    """Holds a plain (unregistered) reference to a timm module, so the weights have one owner: ``HookedViT.vit``."""

    def __init__(self, target: nn.Module, layer_scale: Optional[nn.Module] = None, post_norm: bool = False):
        super().__init__()
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "layer_scale", layer_scale)
        self.post_norm = post_norm

    def _scaled(self, weight: torch.Tensor) -> torch.Tensor:
        """Fold the block's LayerScale (if any) into an output weight or bias; refused for post-norm blocks."""
        if self.post_norm:
            raise ValueError(
                "Output weights (W_O, b_O, W_out, b_out, OV, hook_result) are undefined for post-norm "
                "(ResPostBlock) blocks: the block LayerNorms the sublayer output before adding it, so no fixed "
                "matrix maps it to the residual stream. Use the cached hook_attn_out / hook_mlp_out instead."
            )
        return weight * self.layer_scale.gamma if isinstance(self.layer_scale, LayerScale) else weight


class NormWeights(_Wrapper):
    """``w`` and ``b`` of a LayerNorm (TransformerLens' names)."""

    def _affine(self, name: str) -> torch.Tensor:
        norm = self.target
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"{self.name} is a {type(norm).__name__}, not a LayerNorm: it has no w/b "
                             "(fc_norm models: the final norm is model.vit.fc_norm, applied after pooling).")
        value = getattr(norm, name)
        if value is None:  # elementwise_affine=False or bias=False: gain 1, bias 0
            return (torch.ones if name == "weight" else torch.zeros)(norm.normalized_shape)
        return value

    @property
    def w(self) -> torch.Tensor:
        """[d_model]: the LayerNorm gain."""
        return self._affine("weight")

    @property
    def b(self) -> torch.Tensor:
        """[d_model]: the LayerNorm bias."""
        return self._affine("bias")


class AttentionWeights(_Wrapper):
    """Per-head weights of a timm ``Attention`` (fused ``qkv`` and ``proj``) as TransformerLens views."""

    def _in_weight(self, i: int) -> torch.Tensor:
        attn = self.target
        rows = attn.qkv.weight[i * attn.attn_dim:(i + 1) * attn.attn_dim]  # [head*d_head d_model], contiguous
        return rows.view(attn.num_heads, attn.head_dim, -1).transpose(1, 2)

    def _in_bias(self, i: int) -> torch.Tensor:
        attn = self.target
        return _bias(attn.qkv)[i * attn.attn_dim:(i + 1) * attn.attn_dim].view(attn.num_heads, attn.head_dim)

    @property
    def W_Q(self) -> torch.Tensor:
        """[head d_model d_head]: query weights (a view of ``qkv.weight``), before qk-norm."""
        return self._in_weight(0)

    @property
    def W_K(self) -> torch.Tensor:
        """[head d_model d_head]: key weights (a view of ``qkv.weight``), before qk-norm."""
        return self._in_weight(1)

    @property
    def W_V(self) -> torch.Tensor:
        """[head d_model d_head]: value weights (a view of ``qkv.weight``)."""
        return self._in_weight(2)

    @property
    def b_Q(self) -> torch.Tensor:
        """[head d_head]"""
        return self._in_bias(0)

    @property
    def b_K(self) -> torch.Tensor:
        """[head d_head]"""
        return self._in_bias(1)

    @property
    def b_V(self) -> torch.Tensor:
        """[head d_head]"""
        return self._in_bias(2)

    def _check_linear_output(self) -> None:
        attn = self.target
        if not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
            what = "normalises z before the projection (scale_norm)" if attn.gate is None else "gates z (gated=True)"
            raise ValueError(f"{self.name} {what}, so a head's output is not z @ W_O: W_O, b_O, OV and "
                             "hook_result are undefined here. Use the cached hook_attn_out instead.")

    @property
    def W_O(self) -> torch.Tensor:
        """[head d_head d_model]: each head's output map, LayerScale folded in (pre-norm blocks)."""
        self._check_linear_output()
        attn = self.target
        return self._scaled(attn.proj.weight.T).reshape(attn.num_heads, attn.head_dim, -1)

    @property
    def b_O(self) -> torch.Tensor:
        """[d_model]: the output bias, LayerScale folded in."""
        self._check_linear_output()
        return self._scaled(_bias(self.target.proj))

    def _check_bilinear(self) -> None:
        attn = self.target
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise ValueError(f"{self.name} normalises q and k (qk_norm=True), so the scores are not bilinear in the "
                             "input and QK is undefined; use the cached hook_q / hook_k.")

    @property
    def QK(self) -> FactoredMatrix:
        """[head d_model d_model]: ``W_Q @ W_K^T`` as a ``FactoredMatrix`` (scores = x QK x^T / sqrt(d_head) plus
        the bias terms); undefined under qk-norm."""
        self._check_bilinear()
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """[head d_model d_model]: ``W_V @ W_O`` as a ``FactoredMatrix`` (LayerScale folded into W_O)."""
        return FactoredMatrix(self.W_V, self.W_O)


class MlpWeights(_Wrapper):
    """MLP keys and values of a timm ``Mlp``."""

    @property
    def W_in(self) -> torch.Tensor:
        """[d_model d_mlp]: the MLP keys (fc1 rows)."""
        return self.target.fc1.weight.T

    @property
    def b_in(self) -> torch.Tensor:
        return _bias(self.target.fc1)

    @property
    def W_out(self) -> torch.Tensor:
        """[d_mlp d_model]: the MLP values (fc2 columns), LayerScale folded in (pre-norm blocks)."""
        if not isinstance(self.target.norm, nn.Identity):
            raise ValueError(f"{self.name} normalises the hidden activations before fc2 (scale_mlp_norm), so "
                             "W_out does not map hook_post to the output; use the cached hook_mlp_out.")
        return self._scaled(self.target.fc2.weight.T)

    @property
    def b_out(self) -> torch.Tensor:
        return self._scaled(_bias(self.target.fc2))


class ModelWeights:
    """Stacked per-layer weights, embeddings and class embeddings of a ``HookedViT`` (mixed into it)."""

    vit: nn.Module
    blocks: nn.ModuleList

    def _stack(self, part: str, name: str) -> torch.Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self.blocks])

    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="[layer head d_model d_head]")
    W_K = property(lambda self: self._stack("attn", "W_K"), doc="[layer head d_model d_head]")
    W_V = property(lambda self: self._stack("attn", "W_V"), doc="[layer head d_model d_head]")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="[layer head d_head d_model]")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="[layer head d_head]")
    b_K = property(lambda self: self._stack("attn", "b_K"), doc="[layer head d_head]")
    b_V = property(lambda self: self._stack("attn", "b_V"), doc="[layer head d_head]")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="[layer d_model]")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="[layer d_model d_mlp]")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="[layer d_mlp]")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="[layer d_mlp d_model]")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="[layer d_model]")

    @property
    def QK(self) -> FactoredMatrix:
        """[layer head d_model d_model]"""
        for block in self.blocks:
            block.attn._check_bilinear()
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """[layer head d_model d_model]"""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def W_E(self) -> torch.Tensor:
        """[chans*patch_h*patch_w d_model]: the patch embedding as a matrix over a patch's pixels flattened in
        (chan, row, col) order (``hook_embed = patches @ W_E + b_E``; a view of the conv weight)."""
        return self.vit.patch_embed.proj.weight.flatten(1).T

    @property
    def b_E(self) -> torch.Tensor:
        """[d_model]"""
        return _bias(self.vit.patch_embed.proj)

    @property
    def W_pos(self) -> torch.Tensor:
        """[pos_embed_tokens d_model]: the learned position embedding at the default grid (a view). It covers the
        prefix tokens too unless the model was built with ``no_embed_class`` (then patches only)."""
        if self.vit.pos_embed is None:
            raise ValueError("This model has no learned position embedding (pos_embed is None).")
        return self.vit.pos_embed[0]

    # -- class embeddings ---------------------------------------------------------------------------------

    @property
    def final_norm(self) -> nn.Module:
        """The norm the class-embedding projection applies per token: ``norm``, or ``fc_norm`` when
        ``norm`` is Identity (global-average-pool models, as in vit-cls_emb)."""
        vit = self.vit
        return vit.fc_norm if isinstance(vit.norm, nn.Identity) else vit.norm

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model n_classes]: the class embeddings (classifier weight, transposed)."""
        return self.vit.head.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        """[n_classes]: the classifier bias."""
        return _bias(self.vit.head)

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Project residual vectors onto the classes: ``head(final_norm(resid))`` per token, [... n_classes].

        This is the class-embedding projection of vit-cls_emb (final norm with its affine, head bias
        included). For the CLS token of the last layer it equals the model's logits (CLS-pooling models);
        on average-pool models ``unembed(mean of the patch tokens)`` is the logits.
        """
        return self.vit.head(self.final_norm(resid))

    def heads(self) -> list[nn.Linear]:
        """The classifier heads: ``[head]``, or ``[head, head_dist]`` for DeiT-distilled models (whose logit is
        the mean of head(CLS) and head_dist(dist))."""
        vit = self.vit
        return [vit.head, vit.head_dist] if getattr(vit, "head_dist", None) is not None else [vit.head]

    def class_directions(self, classes, head: Optional[nn.Linear] = None) -> torch.Tensor:
        """[*classes d_model]: residual direction of each class through `head` (default ``vit.head``), final
        LayerNorm gain folded in."""
        head = self.vit.head if head is None else head
        classes = torch.as_tensor(classes, device=head.weight.device)
        directions = head.weight[classes]
        norm = self.final_norm
        return directions * norm.weight if isinstance(norm, nn.LayerNorm) and norm.weight is not None else directions

    def tokens_to_residual_directions(self, classes) -> torch.Tensor:
        """Residual-stream direction of each class [*classes d_model], with the final LayerNorm gain folded in.

        TransformerLens' ``logit_attrs`` divides each component by the cached final-norm scale and takes
        the dot product with this direction; the attributions then sum to
        ``logit - model.logit_bias(classes)`` (head bias plus the norm bias projected on the class).
        DeiT-distilled models have two heads on two tokens, so no single direction exists: this raises, and
        ``cache.logit_attrs`` attributes through both heads itself.
        """
        if len(self.heads()) > 1:
            raise ValueError(
                "DeiT-distilled logits are the mean of head(CLS) and head_dist(dist): no single residual direction "
                "gives them. Use cache.logit_attrs(stack_over_all_positions, classes), which attributes through both "
                "heads, or model.class_directions(classes, head=model.vit.head_dist) per head."
            )
        return self.class_directions(classes)

    def logit_bias(self, classes) -> torch.Tensor:
        """The part of a class logit that no residual component writes: ``b_U[c] + norm.bias @ W_U[:, c]``
        (averaged over both heads on DeiT-distilled models)."""
        heads = self.heads()
        classes = torch.as_tensor(classes, device=self.W_U.device)
        norm = self.final_norm
        total = 0
        for head in heads:
            bias = _bias(head)[classes]
            if isinstance(norm, nn.LayerNorm) and norm.bias is not None:
                bias = bias + head.weight[classes] @ norm.bias
            total = total + bias
        return total / len(heads)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """[d_model]: the sum of attention (and MLP) output biases written before ``layer`` (and that layer's
        attention bias with ``mlp_input``)."""
        total = self.W_U.new_zeros(self.cfg.d_model)
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total
