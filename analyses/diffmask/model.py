"""DiffMask on a HookedViT: gates over the hidden states, the masked forward, the inference mask, checkpoints.

Vision DiffMask (Nalmpantis et al., CVPRW 2023) learns, for every token, whether the input patch can be replaced
by a learned placeholder without changing the model's output distribution. Gate i reads the patch embedding
(with the raw class-token parameter prepended, no position embedding) and hidden state i, read from HookedViT
hooks: state 0 is ``hook_embed`` itself, state i+1 is ``blocks.{i}.hook_resid_pre``, state L+1 the last block's
``hook_resid_post`` (L+2 gates). The product of the hard-concrete gates 0..k decides, per patch, how much of the
patch embedding is kept; the rest is the placeholder, swapped in at ``hook_embed`` (before the position
embedding), so the ViT itself is never forked or modified. Prefix tokens (CLS, registers) are gated too but only
enter the L0 term, as in the original. (Nalmpantis et al., Vision DiffMask, CVPR Workshops 2023).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from analyses.explain import register
from vitlens import HookedViT

from .gates import Gate, log_keep_probability, sample_gates

DEFAULT_MUL_ACTIVATION = 15.0  # the original's CLI defaults (its constructor's 10 and 5 were never used to train)
DEFAULT_ADD_ACTIVATION = 8.0
METADATA_KEY = "vitlens.diffmask"


class DiffMaskOutput(NamedTuple):
    """One DiffMask forward (the original's ``forward_explainer``), for k+1 evaluated gates.

    logits, logits_orig: [batch n_classes] masked and original; gates: [batch pos] the applied (product) gate;
    expected_L0: [batch pos] log P(product of gates != 0) (or of the last gate alone, not aggregated);
    gates_full, expected_L0_full: [batch pos k+1] per evaluated gate; layer: k.
    """

    logits: torch.Tensor
    logits_orig: torch.Tensor
    gates: torch.Tensor
    expected_L0: torch.Tensor
    gates_full: torch.Tensor
    expected_L0_full: torch.Tensor
    layer: int


def _prefix_parameters(model: HookedViT) -> torch.Tensor:
    """The raw prefix-token parameters in token order (CLS, distillation, registers): [1 n_prefix d_model]."""
    vit = model.vit
    parts = [getattr(vit, name, None) for name in ("cls_token", "dist_token", "reg_token")]
    return torch.cat([p for p in parts if p is not None], 1)


class DiffMask(nn.Module):
    """Vision DiffMask gates for one HookedViT (L blocks -> L+2 gates).

    The ViT is referenced, not owned: ``state_dict`` holds only ``g_hat.{i}.*`` (the gates), ``placeholder``
    [1 1 d_model], ``alpha.{i}`` (the Lagrange multipliers) and the running statistics, the original's layout
    without its ``gate.`` prefix. The ViT must have a class token (the gates' state 0 starts with it).

    Args:
        model: the HookedViT to explain (frozen while training).
        mul_activation, add_activation: the gate logit is ``tanh(...) * mul + add``; `add` is learned.
        placeholder: learn the placeholder (xavier-normal init) or use a zero vector.
        alpha: initial Lagrange multiplier of every layer.
        hidden: hidden units of each gate MLP (default d_model // 4).
    """

    def __init__(self, model: HookedViT, *, mul_activation: float = DEFAULT_MUL_ACTIVATION,
                 add_activation: float = DEFAULT_ADD_ACTIVATION, placeholder: bool = True, alpha: float = 20.0,
                 hidden: int | None = None):
        super().__init__()
        if not isinstance(model, HookedViT):
            raise TypeError(f"DiffMask needs a vitlens.HookedViT, got {type(model).__name__}; wrap a timm model "
                            "with HookedViT.from_timm(vit) or use vitlens.load_model(name)")
        if model.layout.cls_index is None:
            raise ValueError(f"DiffMask needs a model with a class token: its gates read the patch embedding with "
                             f"the class token prepended, and {model.tag!r} has none (class_token=False); use a "
                             "ViT built with a class token")
        d_model, n_layers = model.cfg.d_model, model.cfg.n_layers
        self.__dict__["model"] = model  # a reference, not a submodule: the ViT's weights are not DiffMask's state
        self.config = {"d_model": d_model, "n_layers": n_layers, "hidden": int(hidden or d_model // 4),
                       "mul_activation": float(mul_activation), "placeholder": bool(placeholder),
                       "model": model.tag}
        n_gates = n_layers + 2
        self.g_hat = nn.ModuleList(Gate(d_model, self.config["hidden"], mul_activation, add_activation)
                                   for _ in range(n_gates))
        if placeholder:
            self.placeholder = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, d_model)))
        else:
            self.register_buffer("placeholder", torch.zeros(1, 1, d_model))
        self.alpha = nn.ParameterList(nn.Parameter(torch.tensor(float(alpha))) for _ in range(n_gates))
        self.register_buffer("running_acc", torch.ones(n_gates))
        self.register_buffer("running_l0", torch.ones(n_gates))
        self.register_buffer("running_steps", torch.zeros(n_gates))
        self.state_hooks = ["hook_embed", *(f"blocks.{i}.hook_resid_pre" for i in range(n_layers)),
                            f"blocks.{n_layers - 1}.hook_resid_post"]

    @property
    def n_gates(self) -> int:
        return len(self.g_hat)

    # -- the pieces ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The original logits [batch n_classes] and the L+2 hidden states the gates read, [batch pos d_model]
        each; state 0 is the patch embedding with the prefix-token parameters prepended."""
        logits, cache = self.model.run_with_cache(images, names_filter=self.state_hooks)
        states = [cache[name] for name in self.state_hooks]
        prefix = _prefix_parameters(self.model).to(states[0].dtype)
        states[0] = torch.cat([prefix.expand(len(images), -1, -1), states[0]], 1)
        return logits, states

    def gate_logits(self, states: list[torch.Tensor], n: int | None = None) -> torch.Tensor:
        """Logits of gates 0..n-1 (all by default) from the hidden states: [batch pos n]."""
        n = self.n_gates if n is None else n
        return torch.stack([self.g_hat[i](states[0], states[i]) for i in range(n)], -1)

    def masked_logits(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Logits with each patch embedding scaled by `keep` and the placeholder filling the rest.

        keep: [batch patches] or [batch grid_h grid_w] in [0, 1]; all ones gives exactly the original logits.
        """
        keep = keep.flatten(1)
        n_patches = self.model.layout_for(images).n_patches
        if keep.shape != (len(images), n_patches):
            raise ValueError(f"keep must be [batch patches] = [{len(images)} {n_patches}] for these images, got "
                             f"{tuple(keep.shape)}")

        def replace(embed: torch.Tensor, hook) -> torch.Tensor:
            k = keep.to(embed.dtype).unsqueeze(-1)
            return embed * k + self.placeholder.to(embed.dtype) * (1 - k)

        return self.model.run_with_hooks(images, fwd_hooks=[("hook_embed", replace)])

    def forward(self, images: torch.Tensor, layer: int | None = None, *, aggregated: bool = True,
                read: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> DiffMaskOutput:
        """Sample gates 0..`layer` (all when None), mask the input with their product and run the ViT.

        `read` reuses :meth:`read`'s output for the same images (the ViT is frozen, so it does not change).
        """
        logits_orig, states = self.read(images) if read is None else read
        layer = self.n_gates - 1 if layer is None else int(layer)
        logits = self.gate_logits(states, layer + 1)
        gates_full = sample_gates(logits).cumprod(-1)
        log_keep = log_keep_probability(logits)
        expected_full = log_keep.cumsum(-1) if aggregated else log_keep
        gates = gates_full[..., -1]
        masked = self.masked_logits(images, gates[:, self.model.layout.n_prefix:])
        return DiffMaskOutput(masked, logits_orig, gates, expected_full[..., -1], gates_full, expected_full, layer)

    @torch.no_grad()
    def mask(self, images: torch.Tensor, *, gate: int = -1, aggregated: bool = True) -> torch.Tensor:
        """Images [batch C H W] -> [batch grid_h grid_w]: the probability that the product of gates 0..gate is
        non-zero (``aggregated``), or that gate `gate` alone is; deterministic (no sampling).

        With the defaults this is prod_i sigmoid(logit_i + 0.2 ln 5) over all L+2 gates, the original's
        ``get_mask`` before its nearest upsampling to pixels.
        """
        if not -self.n_gates <= gate < self.n_gates:
            raise ValueError(f"gate must be in [-{self.n_gates}, {self.n_gates - 1}] (this DiffMask has "
                             f"{self.n_gates} gates: the embedding, {self.n_gates - 2} block inputs and the output), "
                             f"got {gate}")
        _, states = self.read(images)
        log_keep = log_keep_probability(self.gate_logits(states).float())
        if aggregated:
            log_keep = log_keep.cumsum(-1)
        layout = self.model.layout_for(images)
        return log_keep[..., gate].exp()[:, layout.n_prefix:].reshape(len(images), *layout.grid)

    # -- checkpoints --------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the gate state to a safetensors file (with the sizes and activation settings as metadata)."""
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(self.config)})
        tmp.replace(path)

    @classmethod
    def load(cls, model: HookedViT, path: str | Path) -> "DiffMask":
        """A DiffMask saved by :meth:`save` (or ``vitlens train-diffmask``) for `model`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no DiffMask checkpoint at {path}; train one with `vitlens train-diffmask "
                                    "--out DIR` (it writes DIR/diffmask.safetensors) or pass DiffMask.from_original")
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} is not a vitlens DiffMask checkpoint (no {METADATA_KEY!r} metadata); for the "
                             "original's checkpoints use DiffMask.from_original(model, path)")
        config = json.loads(metadata[METADATA_KEY])
        check_sizes(model, config["d_model"], config["n_layers"], str(path))
        diffmask = cls(model, mul_activation=config["mul_activation"], placeholder=config["placeholder"],
                       hidden=config["hidden"])
        diffmask.load_state_dict(load_file(str(path)))
        return diffmask.to(next(model.parameters()).device)

    @classmethod
    def from_original(cls, model: HookedViT, path_or_state_dict, *,
                      mul_activation: float | None = None) -> "DiffMask":
        """A Vision-DiffMask checkpoint (its Lightning ``.ckpt``, or the state dict) for a timm ViT of its size.

        Keys as the original names them (``gate.g_hat.{i}.f.0.weight_v``, ``gate.placeholder``, ``alpha.{i}``),
        with either weight-norm style. `mul_activation` is not in the state dict: it comes from the ``.ckpt``'s
        hyper-parameters when readable, else this argument (default 15, the original's CLI default).
        """
        from .original import read_original

        state, hparams = read_original(path_or_state_dict)
        n_gates = len({key.split(".")[1] for key in state if key.startswith("g_hat.")})
        check_sizes(model, state["placeholder"].shape[-1], n_gates - 2, "the original checkpoint")
        mul = mul_activation if mul_activation is not None else hparams.get("mul_activation", DEFAULT_MUL_ACTIVATION)
        hidden = state["g_hat.0.f.0.parametrizations.weight.original1"].shape[0]
        diffmask = cls(model, mul_activation=float(mul), hidden=hidden)
        missing, unexpected = diffmask.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("alpha.", "running_"))]  # absent from state-dict-only files
        if missing or unexpected:
            raise ValueError(f"the original checkpoint does not match DiffMask's layout: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        return diffmask.to(next(model.parameters()).device)


_CACHE_ATTRIBUTE = "_vitlens_diffmask_gates"  # on the model: (file key, DiffMask) of the gates loaded last


def load_cached(model: HookedViT, path: str | Path) -> DiffMask:
    """``DiffMask.load(model, path)``, kept for the next call with the same model and unchanged file.

    Explaining with ``gates=PATH`` (every batch of a recording calls :func:`explain_diffmask`) reads the file
    and builds the gates once. The cache is one entry on the model object itself, keyed on the resolved path,
    the file's inode, mtime and size and the model's device, so a rewritten file or a moved model loads again,
    and it goes away with the model (a module-level cache would keep every model alive).
    """
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return DiffMask.load(model, path)  # raises FileNotFoundError naming the fix
    key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, str(next(model.parameters()).device))
    cached = model.__dict__.get(_CACHE_ATTRIBUTE)
    if cached is None or cached[0] != key:
        cached = model.__dict__[_CACHE_ATTRIBUTE] = (key, DiffMask.load(model, path))
    return cached[1]


def check_sizes(model: HookedViT, d_model: int, n_layers: int, source: str) -> None:
    """Raise ValueError naming both sizes when a checkpoint was made for another width or depth."""
    want = (model.cfg.d_model, model.cfg.n_layers)
    if (int(d_model), int(n_layers)) != want:
        raise ValueError(f"{source} was trained for a ViT with d_model {int(d_model)} and {int(n_layers)} blocks "
                         f"({int(n_layers) + 2} gates), but {model.tag!r} has d_model {want[0]} and {want[1]} blocks; "
                         "load it with a ViT of the checkpoint's size or train new gates for this model")


@register("diffmask", options={"gates": None, "gate": -1, "aggregated": True}, resolution="tokens",
          description="Vision DiffMask: the probability that learned hard-concrete gates keep each patch; it "
                      "explains the model's own output distribution, so `target` is ignored",
          paper="Nalmpantis et al., Vision DiffMask: Faithful Interpretation of Vision Transformers with "
                "Differentiable Patch Masking, CVPRW 2023", own_target=True)
def explain_diffmask(model: HookedViT, images: torch.Tensor, target: torch.Tensor | None = None, *,
                     compat: bool = False, gates: "DiffMask | str | Path | None" = None, gate: int = -1,
                     aggregated: bool = True) -> torch.Tensor:
    """[batch grid_h grid_w] DiffMask masks of `images` from trained `gates` (a checkpoint path or a DiffMask).

    `target` is ignored: DiffMask keeps the patches that preserve the whole predicted distribution. `compat`
    changes nothing here (the original's inference mask has no bug; its training does, see :mod:`.train`).
    A path is loaded once per model and file (:func:`load_cached`), not once per call or recorded batch.
    """
    if gates is None:
        raise ValueError("diffmask needs trained gates: pass gates=PATH (DIR/diffmask.safetensors written by "
                         "`vitlens train-diffmask --out DIR`, or DiffMask.save) or a DiffMask object")
    diffmask = gates if isinstance(gates, DiffMask) else load_cached(model, gates)
    if diffmask.model is not model:
        raise ValueError("these DiffMask gates were built for another model object; build or load them with the "
                         "model you explain (DiffMask.load(model, path))")
    return diffmask.mask(images, gate=gate, aggregated=aggregated)
