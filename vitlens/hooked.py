"""HookedViT: TransformerLens hook points on an unmodified timm VisionTransformer.

The wrapper owns no weights of its own. It keeps the timm model as ``model.vit`` and replays timm's forward
path module by module (the same modules, ops and order), passing every activation through a named
:class:`~transformer_lens.hook_points.HookPoint`. With no hooks attached anywhere, ``forward`` simply calls timm's forward; with hooks, the
replayed path gives the same bits wherever the hooks return nothing.

Hook names follow TransformerLens::

    hook_embed                     [batch patch d_model]   patch embedding, before prefix tokens
    hook_full_embed                [batch pos d_model]     after prefix tokens, pos_embed and norm_pre
    blocks.{l}.hook_resid_pre      [batch pos d_model]
    blocks.{l}.ln1.hook_scale      [batch pos 1]           (only for LayerNorm)
    blocks.{l}.ln1.hook_normalized [batch pos d_model]
    blocks.{l}.attn.hook_q/k/v/z   [batch pos head d_head]
    blocks.{l}.attn.hook_attn_scores, hook_pattern  [batch head query_pos key_pos]
    blocks.{l}.hook_attn_out       [batch pos d_model]     after LayerScale (what the residual adds)
    blocks.{l}.hook_resid_mid      [batch pos d_model]
    blocks.{l}.ln2.hook_scale/hook_normalized
    blocks.{l}.mlp.hook_pre        [batch pos d_mlp]       fc1 output, before the activation
    blocks.{l}.mlp.hook_post       [batch pos d_mlp]
    blocks.{l}.hook_mlp_out        [batch pos d_model]
    blocks.{l}.hook_resid_post     [batch pos d_model]
    ln_final.hook_scale/hook_normalized                    the model's final ``norm`` (Identity for fc_norm models)
    hook_pooled                    [batch d_model]         pooled, after fc_norm ([batch 2 d_model] for DeiT-distilled)
    hook_logits                    [batch n_classes]

Token layout: index 0 is CLS (when present), then distillation and register tokens, then the patches in
row-major order (:class:`TokenLayout`).

Attention stays fused (``F.scaled_dot_product_attention``) in every block where no hook reads the attention
scores or pattern; only those blocks run the explicit softmax path. q, k, v and z hooks work on both paths.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache as _TLActivationCache
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice

from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer


class UnsupportedModelError(TypeError):
    """The timm model uses a family that HookedViT does not wrap (named in the message)."""


class UnknownHookError(KeyError):
    """A hook name that the model does not have; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _bypass(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """Run ``point`` only when a hook is attached: an idle HookPoint is the identity, and skipping the
    module call keeps the unhooked forward as fast as timm's."""
    if point._forward_hooks or point._backward_hooks:
        return point(x)
    return x


def _active(point: HookPoint) -> bool:
    return bool(point._forward_hooks or point._backward_hooks)


def _any_active(points: Sequence[HookPoint]) -> bool:
    for point in points:  # a plain loop: any() over a generator costs more than the checks on tiny models
        if point._forward_hooks or point._backward_hooks:
            return True
    return False


def _bias(linear: nn.Linear) -> torch.Tensor:
    """A Linear's bias, or zeros in its weight's dtype and device when it has none."""
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _bypass_heads(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """Hook a timm [batch head pos d_head] tensor as TransformerLens' [batch pos head d_head]."""
    return point(x.transpose(1, 2)).transpose(1, 2) if _active(point) else x


class _HookNames(dict):
    """``mod_dict`` that answers an unknown name with the closest known hook names."""

    def __missing__(self, name):
        hooks = [n for n in self if ".hook_" in n or n.startswith("hook_")]
        close = difflib.get_close_matches(str(name), hooks, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownHookError(
            f"Unknown hook name {name!r}.{hint} `model.hook_dict` lists all {len(hooks)} hook names."
        )


# ---------------------------------------------------------------------------------------------------------
# Token layout


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in the sequence: prefix tokens first, then patches in row-major order.

    Attributes:
        cls_index: index of the class token, or None for models without one.
        dist_index: index of the DeiT distillation token, or None.
        register_indices: indices of register tokens (empty when none).
        n_prefix: number of tokens before the first patch (``num_prefix_tokens``).
        grid: the patch grid (rows, cols) for the model's default image size.
    """

    cls_index: Optional[int]
    dist_index: Optional[int]
    register_indices: tuple[int, ...]
    n_prefix: int
    grid: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def with_grid(self, grid: Sequence[int]) -> "TokenLayout":
        """The same layout for another image size (dynamic_img_size models)."""
        return TokenLayout(self.cls_index, self.dist_index, self.register_indices, self.n_prefix,
                           (int(grid[0]), int(grid[1])))

    def tokens(self, kind: str = "all") -> torch.Tensor:
        """Token indices of one kind: "all", "cls", "dist", "registers", "prefix" or "patches"."""
        kinds = {
            "all": range(self.n_tokens),
            "cls": [] if self.cls_index is None else [self.cls_index],
            "dist": [] if self.dist_index is None else [self.dist_index],
            "registers": self.register_indices,
            "prefix": range(self.n_prefix),
            "patches": range(self.n_prefix, self.n_tokens),
        }
        if kind not in kinds:
            raise ValueError(f"Unknown token kind {kind!r}; expected one of {sorted(kinds)}.")
        if kind == "cls" and self.cls_index is None:
            raise ValueError("This model has no class token (global-average-pool family); use 'patches'.")
        return torch.tensor(list(kinds[kind]), dtype=torch.long)

    def patch_position(self, token: int) -> tuple[int, int]:
        """(row, col) of a patch token on the grid."""
        if not self.n_prefix <= token < self.n_tokens:
            raise ValueError(f"Token {token} is not a patch token (patches are {self.n_prefix}..{self.n_tokens - 1}).")
        return divmod(token - self.n_prefix, self.grid[1])

    def describe(self, token: int) -> str:
        """A readable name for a token: "cls", "dist", "reg0", or "patch(r,c)"."""
        if token == self.cls_index:
            return "cls"
        if token == self.dist_index:
            return "dist"
        if token in self.register_indices:
            return f"reg{self.register_indices.index(token)}"
        return "patch({},{})".format(*self.patch_position(token))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        """Inverse of :meth:`to_dict` (also from JSON, where tuples became lists)."""
        return cls(d["cls_index"], d["dist_index"], tuple(d["register_indices"]), d["n_prefix"], tuple(d["grid"]))

    @classmethod
    def from_timm(cls, vit: VisionTransformer) -> "TokenLayout":
        has_cls = getattr(vit, "cls_token", None) is not None
        has_dist = getattr(vit, "dist_token", None) is not None
        n_reg = vit.reg_token.shape[1] if getattr(vit, "reg_token", None) is not None else 0
        first_reg = int(has_cls) + int(has_dist)
        return cls(
            cls_index=0 if has_cls else None,
            dist_index=int(has_cls) if has_dist else None,
            register_indices=tuple(range(first_reg, first_reg + n_reg)),
            n_prefix=vit.num_prefix_tokens,
            grid=tuple(int(g) for g in vit.patch_embed.grid_size),
        )


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ViTConfig:
    """The model facts that TransformerLens helpers and vitlens analyses read (``model.cfg``)."""

    model_name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    normalization_type: Optional[str]
    global_pool: str
    act_fn: str = "gelu"
    attn_only: bool = False
    positional_embedding_type: str = "standard"
    default_prepend_bos: bool = False
    final_rms: bool = False
    use_attn_result: bool = False
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Hooked building blocks. Each holds only HookPoints and a plain (unregistered) reference to its timm module,
# so the weights have exactly one owner: ``HookedViT.vit``.


class _Wrapper(nn.Module):
    def __init__(self, target: nn.Module, layer_scale: Optional[nn.Module] = None, post_norm: bool = False):
        super().__init__()
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "layer_scale", layer_scale)
        self.post_norm = post_norm

    def _scaled(self, weight: torch.Tensor) -> torch.Tensor:
        """Fold the block's LayerScale (if any) into an output weight or bias; refused for post-norm blocks."""
        if self.post_norm:
            raise ValueError(
                "Output weights (W_O, b_O, W_out, b_out) are undefined for post-norm (ResPostBlock) blocks: the block "
                "LayerNorms the sublayer output before adding it, so no fixed matrix maps it to the residual stream. "
                "Use the cached hook_attn_out / hook_mlp_out instead."
            )
        return weight * self.layer_scale.gamma if isinstance(self.layer_scale, LayerScale) else weight


class HookedNorm(_Wrapper):
    """A norm (LayerNorm or Identity) with ``hook_scale`` and ``hook_normalized``."""

    def __init__(self, norm: nn.Module):
        super().__init__(norm)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()
        object.__setattr__(self, "_points", (self.hook_scale, self.hook_normalized))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A hook on ``hook_scale`` that returns a tensor replaces the scale the norm divides by."""
        norm, (hook_scale, hook_normalized) = self.target, self._points
        if _active(hook_scale) and isinstance(norm, nn.LayerNorm):
            # The fused layer_norm kernel does not expose its statistics; recompute them for the hook.
            scale = (x.float().var(-1, keepdim=True, unbiased=False) + norm.eps).sqrt().to(x.dtype)
            hooked = hook_scale(scale)
            if hooked is not scale:  # replaced: the LayerNorm by hand with the hook's scale
                x = (x - x.mean(-1, keepdim=True)) / hooked
                if norm.weight is not None:
                    x = x * norm.weight
                if norm.bias is not None:
                    x = x + norm.bias
                return _bypass(hook_normalized, x)
        return _bypass(hook_normalized, norm(x))


class HookedAttention(_Wrapper):
    """timm ``Attention`` with TransformerLens hooks; fused unless scores or pattern are hooked."""

    _HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")

    def __init__(self, attn: Attention, layer_scale: Optional[nn.Module] = None, post_norm: bool = False):
        super().__init__(attn, layer_scale, post_norm)
        for name in self._HOOKS:
            setattr(self, name, HookPoint())
        object.__setattr__(self, "_points", tuple(getattr(self, n) for n in self._HOOKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.target
        if not _any_active(self._points):
            return attn(x)  # timm's own forward, fused when timm built it fused
        hook_q, hook_k, hook_v, hook_scores, hook_pattern, hook_z = self._points
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if attn.gate is not None else None
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = _bypass_heads(hook_q, q), _bypass_heads(hook_k, k), _bypass_heads(hook_v, v)
        if attn.fused_attn and not (_active(hook_scores) or _active(hook_pattern)):
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        else:
            scores = _bypass(hook_scores, (q * attn.scale) @ k.transpose(-2, -1))
            z = attn.attn_drop(_bypass(hook_pattern, scores.softmax(dim=-1))) @ v
        z = _bypass(hook_z, z.transpose(1, 2))
        out = attn.norm(z.reshape(B, N, attn.attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    @property
    def W_O(self) -> torch.Tensor:
        """[head d_head d_model]: each head's output map, LayerScale folded in (pre-norm blocks)."""
        attn = self.target
        return self._scaled(attn.proj.weight.T).reshape(attn.num_heads, attn.head_dim, -1)

    @property
    def b_O(self) -> torch.Tensor:
        """[d_model]: the output bias, LayerScale folded in."""
        return self._scaled(_bias(self.target.proj))


class HookedMlp(_Wrapper):
    """timm ``Mlp`` with ``hook_pre`` (fc1 output) and ``hook_post`` (after the activation)."""

    def __init__(self, mlp: Mlp, layer_scale: Optional[nn.Module] = None, post_norm: bool = False):
        super().__init__(mlp, layer_scale, post_norm)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        object.__setattr__(self, "_points", (self.hook_pre, self.hook_post))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp, (hook_pre, hook_post) = self.target, self._points
        x = _bypass(hook_pre, mlp.fc1(x))
        x = _bypass(hook_post, mlp.act(x))
        return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(x))))

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
        return self._scaled(self.target.fc2.weight.T)

    @property
    def b_out(self) -> torch.Tensor:
        return self._scaled(_bias(self.target.fc2))


class HookedBlock(_Wrapper):
    """A timm ``Block`` (pre-norm) or ``ResPostBlock`` (post-norm) with residual-stream hooks.

    ``hook_attn_out`` and ``hook_mlp_out`` are exactly what the block adds to the residual stream (after
    LayerScale, or after the post-norm of ``ResPostBlock``), so ``resid_pre + attn_out == resid_mid``.
    """

    def __init__(self, block: nn.Module):
        super().__init__(block, post_norm=isinstance(block, ResPostBlock))
        self.hook_resid_pre = HookPoint()
        self.ln1 = HookedNorm(block.norm1)
        self.attn = HookedAttention(block.attn, getattr(block, "ls1", None), self.post_norm)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.ln2 = HookedNorm(block.norm2)
        self.mlp = HookedMlp(block.mlp, getattr(block, "ls2", None), self.post_norm)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        object.__setattr__(self, "_points", (self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid,
                                             self.hook_mlp_out, self.hook_resid_post))
        object.__setattr__(self, "_sublayers", (self.ln1.forward, self.attn.forward, self.ln2.forward,
                                                self.mlp.forward))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.target
        # Plain-attribute access and direct .forward calls: the containers never carry hooks themselves (their
        # HookPoints do), and nn.Module attribute lookup is a measurable cost on tiny models.
        resid_pre, attn_out, resid_mid, mlp_out, resid_post = self._points
        ln1, attn, ln2, mlp = self._sublayers
        x = _bypass(resid_pre, x)
        if self.post_norm:  # x + drop_path(norm(sublayer(x)))
            a = b.drop_path1(ln1(attn(x)))
        else:  # x + drop_path(ls(sublayer(norm(x))))
            a = b.drop_path1(b.ls1(attn(ln1(x))))
        x = _bypass(resid_mid, x + _bypass(attn_out, a))
        if self.post_norm:
            m = b.drop_path2(ln2(mlp(x)))
        else:
            m = b.drop_path2(b.ls2(mlp(ln2(x))))
        return _bypass(resid_post, x + _bypass(mlp_out, m))


# ---------------------------------------------------------------------------------------------------------
# The model


class ActivationCache(_TLActivationCache):
    """TransformerLens ``ActivationCache`` that knows the ViT embedding.

    ``hook_embed`` holds patch embeddings only (no prefix tokens), so it cannot be stacked with the residual
    stream; the residual decomposition uses ``hook_full_embed`` (patches + prefix tokens + position
    embedding) as its "embed" component instead.
    """

    def __init__(self, cache_dict, model, has_batch_dim: bool = True):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.has_embed = False

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None,
                        incl_embeds=True, return_labels=False):
        """The residual stream into ``layer`` as [component batch pos d_model]: embed, then every attention
        and MLP output. Same arguments and labels as TransformerLens."""
        parts, labels = super().decompose_resid(layer, mlp_input, mode, apply_ln=False, pos_slice=pos_slice,
                                                incl_embeds=False, return_labels=True)
        if incl_embeds:
            embed = Slice(pos_slice).apply(self["hook_full_embed"], dim=-2)
            parts, labels = torch.cat([embed[None], parts]), ["embed", *labels]
        if apply_ln:
            parts = self.apply_ln_to_stack(parts, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (parts, labels) if return_labels else parts

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, *args, **kwargs):
        """TransformerLens' ``apply_ln_to_stack`` (also behind ``apply_ln=True`` and ``logit_attrs``); raises
        where the model has no per-token LayerNorm at that input, instead of returning the stack unnormalised."""
        model = self.model
        if layer is None or layer in (-1, model.cfg.n_layers):
            if isinstance(model.vit.fc_norm, nn.LayerNorm):
                raise ValueError(
                    "This model has no per-token final LayerNorm to apply: it average-pools the tokens and then "
                    "applies fc_norm to the pooled vector. Use model.unembed(resid) for a per-token class projection."
                )
        elif any(block.post_norm for block in model.blocks):
            raise ValueError(
                "This model has post-norm (ResPostBlock) blocks: their LayerNorms act on sublayer outputs, not on "
                "the residual stream, so there is no block-input LayerNorm to apply. Use apply_ln=False."
            )
        return super().apply_ln_to_stack(residual_stack, layer, mlp_input, *args, **kwargs)


class HookedViT(HookedRootModule):
    """A timm VisionTransformer with TransformerLens hook points; see the module docstring for the names.

    Build it with :meth:`from_timm` (or :func:`vitlens.load_model`). ``run_with_cache`` returns a
    :class:`ActivationCache`; ``run_with_hooks`` and ``hooks()`` behave as in TransformerLens, and a hook
    that returns a tensor replaces the activation.
    """

    def __init__(self, vit: VisionTransformer, tag: Optional[str] = None):
        super().__init__()
        _check_supported(vit)
        self.vit = vit
        self.tag = tag or getattr(vit, "default_cfg", {}).get("architecture", type(vit).__name__)
        self.layout = TokenLayout.from_timm(vit)
        self.hook_embed = HookPoint()
        self.hook_full_embed = HookPoint()
        self.blocks = nn.ModuleList(HookedBlock(b) for b in vit.blocks)
        self.ln_final = HookedNorm(vit.norm)
        self.hook_pooled = HookPoint()
        self.hook_logits = HookPoint()
        self.cfg = self._make_cfg()
        self._in_chans = vit.patch_embed.proj.in_channels
        self._fixed_size = None if vit.dynamic_img_size else self.image_size
        self._weights_hash: Optional[tuple[tuple, str]] = None  # (_weights_key(), hash)
        self.setup()

    @classmethod
    def from_timm(cls, vit: VisionTransformer, tag: Optional[str] = None) -> "HookedViT":
        """Wrap a built timm model (no copy, no conversion). The model is put in eval mode."""
        return cls(vit, tag=tag).eval()

    def setup(self):
        super().setup()
        self.mod_dict = _HookNames(self.mod_dict)
        self.hook_dict = _HookNames(self.hook_dict)
        self._hook_points = tuple(self.hook_dict.values())

    def _make_cfg(self) -> ViTConfig:
        vit = self.vit
        attn, mlp = vit.blocks[0].attn, vit.blocks[0].mlp
        return ViTConfig(
            model_name=self.tag,
            n_layers=len(vit.blocks),
            d_model=vit.embed_dim,
            n_heads=attn.num_heads,
            d_head=attn.head_dim,
            d_mlp=mlp.fc1.out_features,
            d_vocab=vit.num_classes,
            n_ctx=self.layout.n_tokens,
            normalization_type="LN" if isinstance(vit.norm, nn.LayerNorm) else None,
            global_pool=vit.global_pool,
        )

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [batch chans height width] -> logits [batch n_classes], through every hook point."""
        self._check_input(x)
        if not _any_active(self._hook_points):
            return self.vit(x)  # nothing to record or patch: timm's own forward, fastest and exact by definition
        x = self.embed(x)
        for block in self.blocks:
            x = block.forward(x)
        x = self.ln_final.forward(x)
        return _bypass(self.hook_logits, self._head(x))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens, position embedding and ``norm_pre``: [batch pos d_model]."""
        vit = self.vit
        x = vit.patch_embed(images)
        if x.ndim == 4:  # dynamic_img_size: patch_embed gives NHWC and _pos_embed resamples for that grid
            B, H, W, D = x.shape
            x = _bypass(self.hook_embed, x.flatten(1, 2)).reshape(B, H, W, D)
        else:
            x = _bypass(self.hook_embed, x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return _bypass(self.hook_full_embed, x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_head with ``hook_pooled`` between the pooling and the classifier."""
        vit = self.vit
        if self.layout.dist_index is not None:  # DeiT-distilled: mean of the CLS head and the dist-token head
            pooled = _bypass(self.hook_pooled, vit.head_drop(x[:, :2]))
            return (vit.head(pooled[:, 0]) + vit.head_dist(pooled[:, 1])) / 2
        pooled = _bypass(self.hook_pooled, vit.forward_head(x, pre_logits=True))
        return vit.head(pooled)

    def _check_input(self, x: torch.Tensor) -> None:
        chans = self._in_chans
        if x.ndim != 4 or x.shape[1] != chans:
            raise ValueError(
                f"Expected images shaped [batch {chans} height width], got {tuple(x.shape)}. "
                f"Preprocess with `model.transform` (grayscale images: convert to {chans} channels)."
            )
        if self._fixed_size is not None and x.shape[-2:] != self._fixed_size:
            raise ValueError(
                f"Expected {self.image_size[0]}x{self.image_size[1]} images, got {x.shape[-2]}x{x.shape[-1]}. "
                "Resize with `model.transform`, or build the timm model with dynamic_img_size=True."
            )

    # -- structure ----------------------------------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.vit.patch_embed.img_size)

    def layout_for(self, images: torch.Tensor) -> TokenLayout:
        """The token layout for a batch of images (the grid changes with the size on dynamic models)."""
        return self.layout.with_grid(self.vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))

    def tokens(self, kind: str = "all") -> torch.Tensor:
        """Token indices of one kind ("all", "cls", "dist", "registers", "prefix", "patches")."""
        return self.layout.tokens(kind)

    @property
    def data_config(self) -> dict:
        """timm's preprocessing for this model (input_size, mean, std, interpolation, crop).

        ``input_size`` always matches the built model, also when it was made without a pretrained config."""
        from timm.data import resolve_data_config

        config = resolve_data_config(model=self.vit)
        config["input_size"] = (self.vit.patch_embed.proj.in_channels, *self.image_size)
        return config

    @property
    def transform(self):
        """timm's evaluation transform: PIL image -> normalised tensor."""
        from timm.data import create_transform

        return create_transform(**self.data_config)

    def weights_hash(self) -> str:
        """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes); cached until a weight changes."""
        key = self._weights_key()
        if self._weights_hash is None or self._weights_hash[0] != key:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.vit.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_hash = (key, digest.hexdigest())
        return self._weights_hash[1]

    def _weights_key(self) -> tuple:
        """A cheap fingerprint of the weights: in-place writes bump ``_version``; moves and dtype casts
        change the storage (inference tensors have no version counter)."""
        return tuple((t.data_ptr(), None if t.is_inference() else t._version)
                     for t in itertools.chain(self.vit.parameters(), self.vit.buffers()))

    # -- class-embedding geometry -------------------------------------------------------------------------

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
        included). For the CLS token of the last layer it equals the model's logits (CLS-pooling models).
        """
        return self.vit.head(self.final_norm(resid))

    def tokens_to_residual_directions(self, classes) -> torch.Tensor:
        """Residual-stream direction of each class [*classes d_model], with the final LayerNorm gain folded in.

        TransformerLens' ``logit_attrs`` divides each component by the cached final-norm scale and takes
        the dot product with this direction; the attributions then sum to
        ``logit - model.logit_bias(classes)`` (head bias plus the norm bias projected on the class).
        """
        classes = torch.as_tensor(classes, device=self.W_U.device)
        directions = self.W_U[:, classes].movedim(0, -1)
        norm = self.final_norm
        return directions * norm.weight if isinstance(norm, nn.LayerNorm) and norm.weight is not None else directions

    def logit_bias(self, classes) -> torch.Tensor:
        """The part of a class logit that no residual component writes: ``b_U[c] + norm.bias @ W_U[:, c]``."""
        classes = torch.as_tensor(classes, device=self.W_U.device)
        bias = self.b_U[classes]
        norm = self.final_norm
        if isinstance(norm, nn.LayerNorm) and norm.bias is not None:
            bias = bias + norm.bias @ self.W_U[:, classes]
        return bias

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """[d_model]: the sum of attention (and MLP) output biases written before ``layer``."""
        total = self.W_U.new_zeros(self.cfg.d_model)
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total

    # -- TransformerLens entry points ---------------------------------------------------------------------

    def run_with_cache(self, *model_args, names_filter=None, **kwargs):
        """Run and cache activations: ``(logits, ActivationCache)``. Unknown names in ``names_filter`` raise."""
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        for name in [] if names is None or callable(names) else names:
            self.hook_dict[name]  # raises UnknownHookError with the closest names
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        return out, ActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))


def _check_supported(vit: nn.Module) -> None:
    """Raise UnsupportedModelError naming the first family HookedViT cannot replay exactly."""
    if not isinstance(vit, VisionTransformer):
        raise UnsupportedModelError(
            f"HookedViT wraps timm VisionTransformer models; got {type(vit).__name__}. "
            "Hybrid, Swin, EVA and other families have different forward paths."
        )
    if getattr(vit, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"Attention-pool heads (global_pool={vit.global_pool!r}, e.g. SigLIP) are not supported: "
            "the pooled vector does not decompose over tokens. Rebuild with global_pool='token' or 'avg'."
        )
    for i, block in enumerate(vit.blocks):
        if type(block) not in (Block, ResPostBlock):
            raise UnsupportedModelError(f"blocks[{i}] is a {type(block).__name__}; HookedViT supports Block and ResPostBlock.")
        if type(block.attn) is not Attention:
            raise UnsupportedModelError(f"blocks[{i}].attn is a {type(block.attn).__name__}; HookedViT supports timm Attention.")
        if type(block.mlp) is not Mlp:
            raise UnsupportedModelError(
                f"blocks[{i}].mlp is a {type(block.mlp).__name__} (gated MLP); HookedViT supports timm Mlp."
            )
