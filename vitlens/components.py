"""The hooked building blocks of :class:`~vitlens.hooked.HookedViT`: norm, attention, MLP and block.

Each block replays its timm module's forward (the same modules, ops and order) and passes every activation
through a named TransformerLens :class:`~transformer_lens.hook_points.HookPoint`; an idle hook point is skipped
(:func:`_bypass`), so the unhooked path costs what timm's does. A block holds only its HookPoints and plain
(unregistered) references to its timm module and to the shared :class:`ViTConfig`, whose TransformerLens
switches it reads, so the weights have exactly one owner: ``HookedViT.vit``. They live apart from the model
wrapper in :mod:`vitlens.hooked` so that each module stays readable on its own; the hook names and shapes are
listed there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import ResPostBlock
from vitlens.geometry import AttentionWeights, MlpWeights, NormWeights, _Wrapper

__all__ = ["ViTConfig", "HookedNorm", "HookedAttention", "HookedMlp", "HookedBlock"]


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
# Hooked building blocks


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
