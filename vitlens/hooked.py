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
The hooked norm, attention, MLP and block (and ``ViTConfig``) live in :mod:`vitlens.components`, weight geometry
(``W_Q`` ... ``OV``) in :mod:`vitlens.geometry`, the cache in :mod:`vitlens.activation_cache`, the token layout in
:mod:`vitlens.layout`; all their public names are importable from here too.

Attention stays fused (``F.scaled_dot_product_attention``) in every block where no hook reads the attention
scores or pattern; only those blocks run the explicit softmax path. q, k, v and z hooks work on both paths.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from timm.layers import Mlp, QuickGELU
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from vitlens.activation_cache import ActivationCache, canonical_hook_name
from vitlens.components import (HookedAttention, HookedBlock, HookedMlp, HookedNorm, ViTConfig, _active,
                                _any_active, _bypass)
from vitlens.geometry import ModelWeights
from vitlens.layout import TokenLayout

__all__ = ["HookedViT", "TokenLayout", "ActivationCache", "ViTConfig", "UnknownHookError", "UnsupportedModelError",
           "HookedNorm", "HookedAttention", "HookedMlp", "HookedBlock"]


class UnsupportedModelError(TypeError):
    """The timm model uses a family that HookedViT does not wrap (named in the message)."""


class UnknownHookError(KeyError):
    """A hook name that the model does not have; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


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
    that returns a tensor replaces the activation. ``forward`` is ``embed``, the ``blocks``, ``ln_final`` and
    ``forward_head``, so a forward edited step by step (e.g. on a subset of tokens) can reuse each step.
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
            logits = self.forward_head(self.ln_final.forward(x))
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

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier output from the final-normed residual stream, as timm's ``vit.forward_head``.

        Args:
            x: [batch pos d_model] the last block's residual stream after ``ln_final`` (timm's ``vit.norm``),
                e.g. ``model.ln_final(cache["resid_post", -1])``. Any number of tokens in the model's layout
                (prefix tokens first), so a forward over a subset of the patch tokens can finish here.

        Returns:
            logits [batch n_classes]: pooling (CLS token or average of the patch tokens, then ``fc_norm``),
            ``hook_pooled`` [batch d_model], the classifier, ``hook_logits``. DeiT-distilled models pool
            [batch 2 d_model] (CLS and distillation token) and average the two heads' logits.
        """
        vit = self.vit
        if self.layout.dist_index is not None:  # DeiT-distilled: mean of the CLS head and the dist-token head
            pooled = _bypass(self.hook_pooled, vit.head_drop(x[:, :2]))
            logits = (vit.head(pooled[:, 0]) + vit.head_dist(pooled[:, 1])) / 2
        else:
            logits = vit.head(_bypass(self.hook_pooled, vit.forward_head(x, pre_logits=True)))
        return _bypass(self.hook_logits, logits)

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
