"""HookedViT: TransformerLens hook points on an unmodified timm VisionTransformer.

The wrapper owns no weights of its own. It keeps the timm model as ``model.vit`` and replays timm's forward
path module by module (the same modules, ops and order), passing every activation through a named
:class:`~transformer_lens.hook_points.HookPoint`. With no hooks attached anywhere, ``forward`` simply calls
timm's forward; with hooks, the replayed path gives the same bits wherever the hooks return nothing. A hook
that returns a tensor replaces the activation; one of another shape raises, naming the hook and both shapes.

Hook names follow TransformerLens::

    hook_embed                     [batch patch d_model]   patch embedding, before prefix tokens
    hook_pos_embed                 [batch pos d_model]     the position embedding added to each token (0 where none)
    hook_full_embed                [batch pos d_model]     after prefix tokens, pos_embed and norm_pre
    blocks.{l}.hook_resid_pre      [batch pos d_model]
    blocks.{l}.ln1.hook_scale      [batch pos 1]           (only for LayerNorm)
    blocks.{l}.ln1.hook_normalized [batch pos d_model]
    blocks.{l}.attn.hook_q/k/v/z   [batch pos head d_head] (q, k after qk-norm)
    blocks.{l}.attn.hook_attn_scores, hook_pattern  [batch head query_pos key_pos]
    blocks.{l}.attn.hook_result    [batch pos head d_model] per-head output, LayerScale in (use_attn_result)
    blocks.{l}.attn.hook_q_input/k_input/v_input  [batch pos head d_model]  per-head copies of resid_pre
                                                           (use_split_qkv_input); hook_attn_in (use_attn_in)
    blocks.{l}.hook_attn_out       [batch pos d_model]     after LayerScale (what the residual adds)
    blocks.{l}.hook_resid_mid      [batch pos d_model]
    blocks.{l}.hook_mlp_in         [batch pos d_model]     the MLP branch's input (use_hook_mlp_in)
    blocks.{l}.ln2.hook_scale/hook_normalized
    blocks.{l}.mlp.hook_pre        [batch pos d_mlp]       fc1 output, before the activation
    blocks.{l}.mlp.hook_post       [batch pos d_mlp]
    blocks.{l}.hook_mlp_out        [batch pos d_model]
    blocks.{l}.hook_resid_post     [batch pos d_model]
    ln_final.hook_scale/hook_normalized                    the model's final ``norm`` (Identity for fc_norm models)
    hook_pooled                    [batch d_model]         pooled, after fc_norm ([batch 2 d_model] for DeiT-distilled)
    hook_logits                    [batch n_classes]

``blocks.{l}.hook_q_input`` etc. (TransformerLens' ``get_act_name`` names) are accepted as aliases. The four
switches (``set_use_attn_result``, ``set_use_split_qkv_input``, ``set_use_attn_in``, ``set_use_hook_mlp_in``)
gate their hook points as in TransformerLens; hooking a gated point by name while its switch is off raises.
Weight geometry (``W_Q`` ... ``OV``) lives in :mod:`vitlens.geometry`, the cache in :mod:`vitlens.activation_cache`,
the token layout in :mod:`vitlens.layout`.

Attention stays fused (``F.scaled_dot_product_attention``) in every block where no hook reads the attention
scores or pattern; only those blocks run the explicit softmax path. q, k, v and z hooks work on both paths.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from timm.layers import Mlp, QuickGELU
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from vitlens.activation_cache import ActivationCache, canonical_hook_name
from vitlens.geometry import AttentionWeights, MlpWeights, ModelWeights, NormWeights, _Wrapper
from vitlens.layout import TokenLayout

__all__ = ["HookedViT", "TokenLayout", "ActivationCache", "ViTConfig", "UnknownHookError", "UnsupportedModelError"]


class UnsupportedModelError(TypeError):
    """The timm model uses a family that HookedViT does not wrap (named in the message)."""


class UnknownHookError(KeyError):
    """A hook name that the model does not have; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _shape_error(point: HookPoint, x: torch.Tensor, y) -> ValueError:
    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
    return ValueError(f"hook on {point.name} returned {got}, but the activation is {tuple(x.shape)}; a hook must "
                      "return a tensor of the activation's shape (or None to keep it)")


def _bypass(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """Run ``point`` only when a hook is attached: an idle HookPoint is the identity, and skipping the
    module call keeps the unhooked forward as fast as timm's. A replacement of another shape raises."""
    if point._forward_hooks or point._backward_hooks:
        y = point(x)
        if y is not x and (not isinstance(y, torch.Tensor) or y.shape != x.shape):
            raise _shape_error(point, x, y)
        return y
    return x


def _active(point: HookPoint) -> bool:
    return bool(point._forward_hooks or point._backward_hooks)


def _any_active(points: Sequence[HookPoint]) -> bool:
    for point in points:  # a plain loop: any() over a generator costs more than the checks on tiny models
        if point._forward_hooks or point._backward_hooks:
            return True
    return False


def _bypass_heads(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """Hook a timm [batch head pos d_head] tensor as TransformerLens' [batch pos head d_head]."""
    return _bypass(point, x.transpose(1, 2)).transpose(1, 2) if _active(point) else x


class _HookNames(dict):
    """``mod_dict`` that resolves TransformerLens' alias names and answers an unknown name with the closest
    known hook names."""

    def __missing__(self, name):
        canonical = canonical_hook_name(name)
        if canonical != name and canonical in self:
            return self[canonical]
        hooks = [n for n in self if ".hook_" in n or n.startswith("hook_")]
        close = difflib.get_close_matches(str(name), hooks, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownHookError(
            f"Unknown hook name {name!r}.{hint} `model.hook_dict` lists all {len(hooks)} hook names."
        )


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ViTConfig:
    """The model facts that TransformerLens helpers and vitlens analyses read (``model.cfg``).

    ``normalization_type`` is that of the block norms (what every block-input read goes through);
    ``n_ctx`` is the token count at the default image size (``model.layout_for(images).n_tokens`` for
    another size on dynamic-size models). ``device`` and ``dtype`` follow the wrapped weights.
    """

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
    n_classes: int = 0
    image_size: tuple = ()
    patch_size: tuple = ()
    eps: float = 1e-6
    dynamic_img_size: bool = False
    act_fn: str = "gelu"
    n_key_value_heads: Optional[int] = None
    attn_only: bool = False
    positional_embedding_type: str = "standard"
    default_prepend_bos: bool = False
    final_rms: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self._owner.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._owner.parameters()).dtype


# ---------------------------------------------------------------------------------------------------------
# Hooked building blocks. Each holds only HookPoints and a plain (unregistered) reference to its timm module
# (and to the shared cfg), so the weights have exactly one owner: ``HookedViT.vit``.


class HookedNorm(NormWeights):
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
            hooked = _bypass(hook_scale, scale)
            if hooked is not scale:  # replaced: the LayerNorm by hand with the hook's scale
                x = (x - x.mean(-1, keepdim=True)) / hooked
                if norm.weight is not None:
                    x = x * norm.weight
                if norm.bias is not None:
                    x = x + norm.bias
                return _bypass(hook_normalized, x)
        return _bypass(hook_normalized, norm(x))


class HookedAttention(AttentionWeights):
    """timm ``Attention`` with TransformerLens hooks; fused unless scores or pattern are hooked.

    Its output is what the block adds before drop-path: LayerScale applied (pre-norm blocks), so that the
    per-head ``hook_result`` sums (plus ``b_O``) to ``hook_attn_out``.
    """

    _HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result",
              "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in")

    def __init__(self, attn: Attention, layer_scale: Optional[nn.Module], post_norm: bool, cfg: ViTConfig):
        super().__init__(attn, layer_scale, post_norm)
        for name in self._HOOKS:
            setattr(self, name, HookPoint())
        object.__setattr__(self, "_points", tuple(getattr(self, n) for n in self._HOOKS[:7]))
        object.__setattr__(self, "cfg", cfg)

    def _scale(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.layer_scale is None else self.layer_scale(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the normalised block input [batch pos d_model] -> what the block adds, before drop-path."""
        attn = self.target
        if not _any_active(self._points):
            return self._scale(attn(x))  # timm's own forward, fused when timm built it fused
        B, N, _ = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        # Indexing, not unbind: views made by unbind cannot be edited in place under autograd (TL demos do).
        return self._attend(qkv[0], qkv[1], qkv[2], x)

    def forward_split(self, resid: torch.Tensor, norm: Optional[nn.Module]) -> torch.Tensor:
        """Split-qkv forward (``use_split_qkv_input`` / ``use_attn_in``): each head reads its own copy of the
        residual stream [batch pos head d_model], normalised by `norm` (ln1; None for post-norm blocks)."""
        attn, cfg = self.target, self.cfg
        if attn.gate is not None:
            raise ValueError(f"{self.name} is gated (gated=True): the gate reads the whole input, so split-qkv "
                             "inputs are undefined here; turn use_split_qkv_input / use_attn_in off.")

        def fork(point: HookPoint) -> torch.Tensor:
            copies = resid.unsqueeze(2).expand(-1, -1, attn.num_heads, -1).clone()
            copies = _bypass(point, copies)
            return copies if norm is None else norm(copies)

        if cfg.use_split_qkv_input:
            inputs = fork(self.hook_q_input), fork(self.hook_k_input), fork(self.hook_v_input)
        else:
            inputs = (fork(self.hook_attn_in),) * 3
        q, k, v = (torch.einsum("bphm,hmd->bhpd", x, w) + b[:, None] for x, w, b in
                   zip(inputs, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V)))
        return self._attend(q, k, v, None)

    def _attend(self, q, k, v, x: Optional[torch.Tensor]) -> torch.Tensor:
        """q, k, v [batch head pos d_head] (before qk-norm) -> the scaled attention output [batch pos d_model]."""
        attn, cfg = self.target, self.cfg
        hook_q, hook_k, hook_v, hook_scores, hook_pattern, hook_z, hook_result = self._points
        B, _, N, _ = q.shape
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = _bypass_heads(hook_q, q), _bypass_heads(hook_k, k), _bypass_heads(hook_v, v)
        if attn.fused_attn and not (_active(hook_scores) or _active(hook_pattern)):
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        else:
            scores = _bypass(hook_scores, (q * attn.scale) @ k.transpose(-2, -1))
            z = attn.attn_drop(_bypass(hook_pattern, scores.softmax(dim=-1))) @ v
        z = _bypass(hook_z, z.transpose(1, 2))  # [batch pos head d_head]
        if cfg.use_attn_result and _active(hook_result):
            result = _bypass(hook_result, torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return attn.proj_drop(result.sum(2) + self.b_O)
        out = attn.norm(z.reshape(B, N, attn.attn_dim))
        if attn.gate is not None:
            out = out * attn.gate(x).sigmoid()
        return self._scale(attn.proj_drop(attn.proj(out)))


class HookedMlp(MlpWeights):
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


class HookedBlock(_Wrapper):
    """A timm ``Block`` (pre-norm) or ``ResPostBlock`` (post-norm) with residual-stream hooks.

    ``hook_attn_out`` and ``hook_mlp_out`` are exactly what the block adds to the residual stream (after
    LayerScale, or after the post-norm of ``ResPostBlock``), so ``resid_pre + attn_out == resid_mid``.
    """

    hook_out_is_single_residual_stream = True  # read by TransformerLens' logit-lens checks

    def __init__(self, block: nn.Module, cfg: ViTConfig):
        super().__init__(block, post_norm=isinstance(block, ResPostBlock))
        self.hook_resid_pre = HookPoint()
        self.ln1 = HookedNorm(block.norm1)
        self.attn = HookedAttention(block.attn, None if self.post_norm else block.ls1, self.post_norm, cfg)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_in = HookPoint()
        self.ln2 = HookedNorm(block.norm2)
        self.mlp = HookedMlp(block.mlp, getattr(block, "ls2", None), self.post_norm)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        object.__setattr__(self, "cfg", cfg)
        object.__setattr__(self, "_points", (self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid,
                                             self.hook_mlp_out, self.hook_resid_post))
        object.__setattr__(self, "_sublayers", (self.ln1.forward, self.attn.forward, self.ln2.forward,
                                                self.mlp.forward))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, cfg = self.target, self.cfg
        # Plain-attribute access and direct .forward calls: the containers never carry hooks themselves (their
        # HookPoints do), and nn.Module attribute lookup is a measurable cost on tiny models.
        resid_pre, attn_out, resid_mid, mlp_out, resid_post = self._points
        ln1, attn, ln2, mlp = self._sublayers
        x = _bypass(resid_pre, x)
        if cfg.use_split_qkv_input or cfg.use_attn_in:
            a = self.attn.forward_split(x, None if self.post_norm else b.norm1)
            a = b.drop_path1(ln1(a) if self.post_norm else a)
        elif self.post_norm:  # x + drop_path(norm(sublayer(x)))
            a = b.drop_path1(ln1(attn(x)))
        else:  # x + drop_path(ls(sublayer(norm(x))))
            a = b.drop_path1(attn(ln1(x)))
        x = _bypass(resid_mid, x + _bypass(attn_out, a))
        m = _bypass(self.hook_mlp_in, x) if cfg.use_hook_mlp_in else x
        if self.post_norm:
            m = b.drop_path2(ln2(mlp(m)))
        else:
            m = b.drop_path2(b.ls2(mlp(ln2(m))))
        return _bypass(resid_post, x + _bypass(mlp_out, m))


# ---------------------------------------------------------------------------------------------------------
# The model

_SWITCHES = {  # hook point suffix -> the cfg switch that makes it fire
    "attn.hook_result": "use_attn_result",
    "attn.hook_q_input": "use_split_qkv_input",
    "attn.hook_k_input": "use_split_qkv_input",
    "attn.hook_v_input": "use_split_qkv_input",
    "attn.hook_attn_in": "use_attn_in",
    "hook_mlp_in": "use_hook_mlp_in",
}


class HookedViT(ModelWeights, HookedRootModule):
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
        self.cfg = self._make_cfg()
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.hook_full_embed = HookPoint()
        self.blocks = nn.ModuleList(HookedBlock(b, self.cfg) for b in vit.blocks)
        self.ln_final = HookedNorm(vit.norm)
        self.hook_pooled = HookPoint()
        self.hook_logits = HookPoint()
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
        attn, mlp, norm = vit.blocks[0].attn, vit.blocks[0].mlp, vit.blocks[0].norm1
        layer_norms = all(isinstance(b.norm1, nn.LayerNorm) and isinstance(b.norm2, nn.LayerNorm) for b in vit.blocks)
        cfg = ViTConfig(
            model_name=self.tag,
            n_layers=len(vit.blocks),
            d_model=vit.embed_dim,
            n_heads=attn.num_heads,
            d_head=attn.head_dim,
            d_mlp=mlp.fc1.out_features,
            d_vocab=vit.num_classes,
            n_ctx=self.layout.n_tokens,
            normalization_type="LN" if layer_norms else None,
            global_pool=vit.global_pool,
            n_classes=vit.num_classes,
            image_size=tuple(int(s) for s in vit.patch_embed.img_size),
            patch_size=tuple(int(s) for s in vit.patch_embed.patch_size),
            eps=getattr(norm, "eps", 0.0),
            dynamic_img_size=bool(vit.dynamic_img_size),
            act_fn="quick_gelu" if isinstance(mlp.act, QuickGELU) else type(mlp.act).__name__.lower(),
            n_key_value_heads=attn.num_heads,
        )
        object.__setattr__(cfg, "_owner", vit)  # not a dataclass field: device/dtype read the live weights
        return cfg

    # -- TransformerLens switches -------------------------------------------------------------------------

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Fire ``blocks.{l}.attn.hook_result`` [batch pos head d_model] (per-head outputs, LayerScale in; they
        sum with ``b_O`` to ``hook_attn_out``). Refused where a head's output is not ``z @ W_O``."""
        if use_attn_result:
            for block in self.blocks:
                block.attn.W_O  # raises for post-norm, gated and scale-normed attention
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of ``resid_pre`` for q, k and v (``attn.hook_q_input`` ... [batch pos head
        d_model], before ln1), for path patching. Exclusive with ``set_use_attn_in``."""
        if use_split_qkv_input and self.cfg.use_attn_in:
            raise ValueError("use_split_qkv_input and use_attn_in are exclusive; call set_use_attn_in(False) first.")
        self.cfg.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head one copy of ``resid_pre`` shared by q, k and v (``attn.hook_attn_in`` [batch pos head
        d_model]). Exclusive with ``set_use_split_qkv_input``."""
        if use_attn_in and self.cfg.use_split_qkv_input:
            raise ValueError("use_attn_in and use_split_qkv_input are exclusive; call "
                             "set_use_split_qkv_input(False) first.")
        self.cfg.use_attn_in = bool(use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Fire ``blocks.{l}.hook_mlp_in`` [batch pos d_model], the MLP branch's own copy of ``resid_mid``."""
        self.cfg.use_hook_mlp_in = bool(use_hook_mlp_in)

    def _switched_off(self, name: str) -> Optional[str]:
        """The switch a hook point needs when it is off (the point would never fire), else None."""
        for suffix, switch in _SWITCHES.items():
            if name.endswith(suffix) and not getattr(self.cfg, switch):
                return switch
        return None

    def _enable_hook_with_name(self, name: str, hook, dir):
        """TransformerLens' by-name hook registration, refusing a point whose switch is off (it would never fire)."""
        canonical = canonical_hook_name(name)
        switch = self._switched_off(canonical)
        if switch:
            raise ValueError(f"{name} fires only with {switch}: call model.set_{switch}(True) first.")
        super()._enable_hook_with_name(canonical, hook, dir)

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, return_type: Optional[str] = "logits", labels: Optional[torch.Tensor] = None,
                stop_at_layer: Optional[int] = None):
        """Images [batch chans height width] -> logits [batch n_classes], through every hook point.

        Args:
            return_type: "logits", "loss" (mean cross-entropy against `labels`, a scalar: what
                ``run_with_cache(incl_bwd=True)`` differentiates), "both" (logits, loss) or None.
            labels: [batch] class indices, for the loss.
            stop_at_layer: run only blocks ``[:stop_at_layer]`` and return the residual stream [batch pos d_model].
        """
        self._check_input(x)
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type={return_type!r}; use 'logits', 'loss', 'both' or None")
        if return_type in ("loss", "both") and labels is None:
            raise ValueError(f"return_type={return_type!r} needs labels= ([batch] class indices)")
        if stop_at_layer is None and not _any_active(self._hook_points):
            logits = self.vit(x)  # nothing to record or patch: timm's own forward, fastest and exact by definition
        else:
            x = self.embed(x)
            for block in self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]:
                x = block.forward(x)
            if stop_at_layer is not None:
                return x
            logits = _bypass(self.hook_logits, self._head(self.ln_final.forward(x)))
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = F.cross_entropy(logits, torch.as_tensor(labels, device=logits.device))
        return loss if return_type == "loss" else (logits, loss)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens, position embedding and ``norm_pre``: [batch pos d_model]."""
        vit = self.vit
        x = vit.patch_embed(images)
        if x.ndim == 4:  # dynamic_img_size: patch_embed gives NHWC and _pos_embed resamples for that grid
            B, H, W, D = x.shape
            x = _bypass(self.hook_embed, x.flatten(1, 2)).reshape(B, H, W, D)
        else:
            x = _bypass(self.hook_embed, x)
        full = vit._pos_embed(x)
        if _active(self.hook_pos_embed):
            tokens = torch.cat([t.expand(len(x), -1, -1) for t in (vit.cls_token, getattr(vit, "dist_token", None),
                                                                   vit.reg_token) if t is not None]
                               + [x.flatten(1, -2)], dim=1)
            pos = full - tokens
            hooked = _bypass(self.hook_pos_embed, pos)
            if hooked is not pos:
                full = tokens + hooked
        x = vit.norm_pre(vit.patch_drop(full))
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

    # -- TransformerLens entry points ---------------------------------------------------------------------

    def run_with_cache(self, *model_args, names_filter=None, return_cache_object: bool = True, **kwargs):
        """Run and cache activations: ``(output, ActivationCache)``, or ``(output, dict)`` with
        ``return_cache_object=False``. Unknown names in ``names_filter`` raise; alias names are accepted."""
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if names is not None and not callable(names):
            names = [canonical_hook_name(name) for name in names]
            for name in names:
                self.hook_dict[name]  # raises UnknownHookError with the closest names
            names_filter = names
        else:  # a filter caches only the points that fire under the current switches
            wanted = names or (lambda name: True)
            names_filter = lambda name: wanted(name) and not self._switched_off(name)  # noqa: E731
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        if not return_cache_object:
            return out, cache
        return out, ActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    def run_with_hooks(self, *model_args, **kwargs):
        """TransformerLens' ``run_with_hooks``. Called by ``transformer_lens.patching``'s sweeps, it refuses a
        position axis taken from the image width (their default) instead of sweeping the wrong positions."""
        caller = sys._getframe(1)
        if caller.f_code.co_name == "generic_activation_patch" and model_args:
            _check_tl_position_count(self, caller.f_locals, model_args[0])
        return super().run_with_hooks(*model_args, **kwargs)


def _check_tl_position_count(model: HookedViT, sweep: dict, images: torch.Tensor) -> None:
    """``transformer_lens.patching.generic_activation_patch`` sizes its position axes from
    ``corrupted_tokens.shape[-1]``: for images that is the width, not the token count."""
    axes = sweep.get("index_axis_names") or ()
    ranges = sweep.get("max_axis_range")
    if sweep.get("flattened_output") or not ranges or not {"pos", "src_pos", "dest_pos"} & set(axes):
        return
    n_tokens = model.layout_for(images).n_tokens
    if ranges["pos"] != n_tokens:
        raise ValueError(
            f"transformer_lens.patching took {ranges['pos']} positions from the image width "
            f"(corrupted_tokens.shape[-1]), but these images have {n_tokens} tokens, so it would sweep the wrong "
            "positions. Use vitlens.patching.act_patch(model, images, clean_cache, metric, kind), or pass "
            "index_df=vitlens.patching.patch_index(model, kind, images)."
        )


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
