"""The original Vision-DiffMask's checkpoints, and Hugging Face ViT weights as timm keys.

The released checkpoints are PyTorch Lightning 1.x ``.ckpt`` files of ``ImageInterpretationNet`` (the ViT's keys
stripped), trained on Hugging Face ``ViTForImageClassification`` models. :func:`read_original` reads one with
``torch.load(weights_only=True)``: the classes a checkpoint names but vitlens never imports (transformers'
``ViTConfig`` in the hyper-parameters) are read into inert stand-ins, so nothing in the file is executed and
transformers is not needed. Keys are renamed to :class:`~analyses.diffmask.model.DiffMask`'s (``gate.`` dropped;
old ``weight_g``/``weight_v`` and new ``parametrizations.weight.original0/1`` weight norm both accepted).
:func:`hf_vit_to_timm` maps the base model's HF state dict to timm's ``VisionTransformer`` keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# HF ViT uses LayerNorm eps 1e-12 (timm: 1e-6): build the timm model with
# norm_layer=functools.partial(torch.nn.LayerNorm, eps=HF_LAYER_NORM_EPS) to reproduce HF logits exactly.
HF_LAYER_NORM_EPS = 1e-12

_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


class _Opaque:
    """Stands in for a class or function a checkpoint names but vitlens never imports; keeps its arguments."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``, with inert stand-ins for the non-torch globals it names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the Vision-DiffMask .ckpt or its state dict")
    foreign = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    try:
        with torch.serialization.safe_globals([(_Opaque, name) for name in foreign]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure gets the same fix
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True) ({error}); in an environment you trust, save "
            "its state dict: torch.save(torch.load(path, weights_only=False)['state_dict'], 'state.pt') and pass "
            "that file or the dict") from None


def read_original(path_or_state_dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Vision-DiffMask checkpoint -> (state dict in DiffMask's key names, hyper-parameters as far as known).

    Accepts a ``.ckpt`` path, a loaded ``.ckpt`` dict (with ``state_dict``) or the state dict itself.
    """
    obj = path_or_state_dict
    if isinstance(obj, (str, Path)):
        obj = load_checkpoint(obj)
    if not isinstance(obj, dict):
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(obj).__name__}")
    hparams = obj.get("hyper_parameters", {}) if "state_dict" in obj else {}
    state = obj["state_dict"] if "state_dict" in obj else obj
    if not any(key.startswith("gate.g_hat.") for key in state):
        raise ValueError(f"not a Vision-DiffMask state dict: no 'gate.g_hat.*' keys (it has {sorted(state)[:4]} ...)")
    converted = {}
    for key, value in state.items():
        if key.startswith("model."):  # the ViT, when a checkpoint kept it
            continue
        key = key.removeprefix("gate.")
        for old, new in _WEIGHT_NORM.items():
            key = re.sub(rf"\.{old}$", f".{new}", key)
        converted[key] = value
    return converted, dict(hparams) if isinstance(hparams, dict) else {}


def hf_vit_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ``ViTForImageClassification`` (or ``ViTModel``) state dict -> timm ``VisionTransformer`` keys.

    Key names of transformers 4 (``encoder.layer.{i}.attention.attention.query``) and 5
    (``layers.{i}.attention.q_proj``) are both read. q, k and v are concatenated into timm's fused ``qkv``; the
    pooler and mask token, which timm's ViT lacks, are refused. Build the timm model with ``norm_layer=partial(nn.LayerNorm, eps=HF_LAYER_NORM_EPS)``,
    ``class_token=True``, ``global_pool="token"`` and the HF sizes for identical logits.
    """
    layer = r"(?:vit\.)?(?:encoder\.layer|layers)\.(?P<i>\d+)\."  # transformers <= 4 and >= 5
    names = {
        r"(?:vit\.)?embeddings\.cls_token": "cls_token",
        r"(?:vit\.)?embeddings\.position_embeddings": "pos_embed",
        r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.(?P<p>weight|bias)": r"patch_embed.proj.\g<p>",
        layer + r"layernorm_before\.(?P<p>weight|bias)": r"blocks.\g<i>.norm1.\g<p>",
        layer + r"attention\.(?:output\.dense|o_proj)\.(?P<p>weight|bias)": r"blocks.\g<i>.attn.proj.\g<p>",
        layer + r"layernorm_after\.(?P<p>weight|bias)": r"blocks.\g<i>.norm2.\g<p>",
        layer + r"(?:intermediate\.dense|mlp\.fc1)\.(?P<p>weight|bias)": r"blocks.\g<i>.mlp.fc1.\g<p>",
        layer + r"(?:output\.dense|mlp\.fc2)\.(?P<p>weight|bias)": r"blocks.\g<i>.mlp.fc2.\g<p>",
        r"(?:vit\.)?layernorm\.(?P<p>weight|bias)": r"norm.\g<p>",
        r"classifier\.(?P<p>weight|bias)": r"head.\g<p>",
    }
    qkv = re.compile(layer + r"attention\.(?:attention\.(?P<n>query|key|value)|(?P<s>[qkv])_proj)\.(?P<p>weight|bias)")
    short = {"q": "query", "k": "key", "v": "value"}
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if match := qkv.fullmatch(key):
            parts.setdefault((match["i"], match["p"]), {})[match["n"] or short[match["s"]]] = value
            continue
        for pattern, target in names.items():
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"no timm ViT equivalent for {unknown[:4]}; pass a ViTForImageClassification state dict "
                       "(without a pooler or mask token)")
    for (layer, kind), qkv_parts in sorted(parts.items()):
        if set(qkv_parts) != {"query", "key", "value"}:
            raise KeyError(f"layer {layer} {kind}: attention has only {sorted(qkv_parts)} of query, key and value")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([qkv_parts[n] for n in ("query", "key", "value")], 0)
    return out
