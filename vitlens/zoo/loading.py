"""How :func:`vitlens.zoo.load_model` and :func:`random_twin` find and build models (see the package docs)."""
from __future__ import annotations

import difflib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from timm.models import get_pretrained_cfg

from vitlens.hooked import HookedViT
from vitlens.zoo.catalog import WEIGHT_SUFFIXES, ZOO

BUNDLED_DIR = Path(__file__).parent  # the bundled models' folders


class WeightsNotFoundError(FileNotFoundError):
    """The weights of a model are not available offline; the message says what to provide."""


def load_model(
    name: Union[str, os.PathLike],
    *,
    checkpoint: Union[str, os.PathLike, None] = None,
    arch: Optional[str] = None,
    pretrained: bool = True,
    allow_download: bool = False,
    device: Union[str, torch.device, None] = None,
    **timm_kwargs,
) -> HookedViT:
    """Build a timm ViT, load its weights offline and wrap it in a :class:`HookedViT` (eval mode).

    Args:
        name: a :data:`ZOO` nickname, a timm model name, ``local-dir:PATH``, a directory, or a checkpoint file.
        checkpoint: a weights file to load into the architecture (``.safetensors``, ``.pth``, ``.bin``).
        arch: the timm architecture of a checkpoint file given as ``name``.
        pretrained: False builds the architecture with random weights (seed it yourself).
        allow_download: let timm fetch missing weights from the Hugging Face hub.
        device: where to put the model.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``dynamic_img_size``).
    """
    vit, tag = _build(name, checkpoint=checkpoint, arch=arch, pretrained=pretrained,
                      allow_download=allow_download, timm_kwargs=timm_kwargs)
    if device is not None:
        vit = vit.to(device)
    return HookedViT.from_timm(vit, tag=tag)


def random_twin(name: Union[str, os.PathLike], *, seed: int = 0, arch: Optional[str] = None,
                device: Union[str, torch.device, None] = None, **timm_kwargs) -> HookedViT:
    """The architecture of ``load_model(name)`` with timm's random init under ``torch.manual_seed(seed)``.

    Works for every source (bundled models and ``local-dir:`` folders take the architecture from their
    ``config.json``, checkpoint files from `arch`) and reads no weights; the global RNG is left as it was.
    The random baselines of the class-embedding study compare a model with its twin. The tag is
    ``"<name's tag> (random init, seed <seed>)"``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit, tag = _build(name, arch=arch, pretrained=False, timm_kwargs=timm_kwargs, twin=True)
    if device is not None:
        vit = vit.to(device)
    return HookedViT.from_timm(vit, tag=f"{tag} (random init, seed {seed})")


def _build(name, *, checkpoint=None, arch=None, pretrained=True, allow_download=False, timm_kwargs: dict,
           twin: bool = False) -> tuple[torch.nn.Module, str]:
    """(timm model, tag) for a load_model source; `twin` builds the architecture with random weights."""
    name = os.path.expanduser(str(name))
    checkpoint = None if checkpoint is None else Path(checkpoint).expanduser()
    # Arguments that a source does not use are refused rather than silently ignored.
    given = [arg for arg, is_given in (("checkpoint=", checkpoint is not None), ("arch=", arch is not None),
                                       ("pretrained=False", not pretrained and not twin),
                                       ("allow_download=True", allow_download))
             if is_given]
    hub_args = ("checkpoint=",) if checkpoint is not None else ("pretrained=False", "allow_download=True")
    if name in ZOO and ZOO[name].bundled:
        _refuse_unused(name, given, (), "a bundled model (its weights ship with vitlens)")
        return _create_from_dir(BUNDLED_DIR / ZOO[name].bundled, timm_kwargs, twin), name
    if name in ZOO:
        entry = ZOO[name]
        _refuse_unused(name, given, hub_args, "a zoo nickname")
        if entry.checkpoint_hint and checkpoint is None and pretrained:
            raise WeightsNotFoundError(
                f"{name!r} has no hub weights: download {entry.checkpoint_hint} and pass "
                f"load_model({name!r}, checkpoint='/path/to/file'), or pretrained=False for random weights."
            )
        return _create(entry.timm_name, checkpoint, pretrained, allow_download, {**entry.kwargs, **timm_kwargs},
                       extra_keys=entry.extra_keys), name
    if name.startswith("local-dir:") or Path(name).is_dir():
        _refuse_unused(name, given, (), "a model folder (its weights come from the folder)")
        path = Path(name.removeprefix("local-dir:")).expanduser()
        return _create_from_dir(path, timm_kwargs, twin), f"local-dir:{path.resolve()}"
    if Path(name).suffix in WEIGHT_SUFFIXES:
        _refuse_unused(name, given, ("arch=",), "a checkpoint file (the file is the weights)")
        if arch is None:
            raise ValueError(f"Loading the checkpoint file {name} needs its architecture: pass arch='<timm model name>'.")
        _check_timm_name(arch)
        return _create(arch, None if twin else name, not twin, False, timm_kwargs), f"{arch}@{Path(name).name}"
    _check_timm_name(name)
    _refuse_unused(name, given, hub_args, "a timm model name")
    return _create(name, checkpoint, pretrained, allow_download, timm_kwargs), name


def _check_timm_name(name: str) -> None:
    """ValueError for a name that is neither a nickname nor a timm model, with close timm names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.8)
        raise ValueError(f"Unknown model {name!r}: not a vitlens nickname ({', '.join(ZOO)}) nor a timm model"
                         + (f"; close timm names: {', '.join(close)}." if close else "."))


def _refuse_unused(name: str, given: list, applies: tuple, source: str) -> None:
    """Raise ValueError naming the given arguments that do not apply to `source`."""
    unused = [arg for arg in given if arg not in applies]
    if unused:
        raise ValueError(
            f"load_model({name!r}): {', '.join(unused)} does not apply to {source} and would be ignored; remove "
            "it. (arch= goes with a checkpoint file given as name; pretrained=False and allow_download=True "
            "with hub weights, not with checkpoint=.)"
        )


def _create_from_dir(path: Path, timm_kwargs: dict, twin: bool = False) -> torch.nn.Module:
    """A folder in timm's ``save_for_hf`` format: config.json + model.safetensors (or pytorch_model.bin).

    Every error names the file at fault; weights that do not fit the architecture (missing, unexpected or
    reshaped keys) are refused. `twin` builds the folder's architecture with random weights."""
    config = path / "config.json"
    if not config.is_file():
        raise WeightsNotFoundError(
            f"{path} is not a model folder: expected config.json and model.safetensors "
            "(written by timm.models.save_for_hf)."
        )
    try:
        architecture = json.loads(config.read_text()).get("architecture")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{config} is not a timm model config ({error}); expected the JSON object with "
                         "'architecture' and 'model_args' that timm.models.save_for_hf writes.") from None
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise ValueError(f"{config} names the architecture {architecture!r}, which is not a timm model; "
                         "expected the config.json that timm.models.save_for_hf writes.")
    if twin:
        return timm.create_model(f"local-dir:{path}", pretrained=False, **timm_kwargs)
    weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
    if weights is None:
        raise WeightsNotFoundError(f"{path} has config.json but no model.safetensors or pytorch_model.bin.")
    from safetensors import SafetensorError

    try:
        return _create_pretrained(f"local-dir:{path}", timm_kwargs)
    except (RuntimeError, SafetensorError, pickle.UnpicklingError, OSError) as error:
        _read_state_dict(weights)  # a file that cannot be read is named here, with the reason
        reason = str(error).strip().splitlines()  # else timm's strict load: missing, unexpected or reshaped keys
        raise ValueError(f"{weights} does not fit {architecture} (from {config}): "
                         f"{' '.join(line.strip() for line in reason[:4])}. Save the folder again with "
                         "timm.models.save_for_hf from the model these weights belong to.") from None


def _create(timm_name: str, checkpoint, pretrained: bool, allow_download: bool, kwargs: dict,
            extra_keys: bool = False) -> torch.nn.Module:
    """timm.create_model with weights from a file, the HF cache, a download (opt-in) or random init.

    A checkpoint must fill every weight of the architecture; keys it does not use are an error unless
    `extra_keys` (then they are dropped)."""
    if checkpoint is not None:
        vit = timm.create_model(timm_name, pretrained=False, **kwargs)
        state = _read_state_dict(Path(checkpoint))
        expected = vit.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = [] if extra_keys else sorted(set(state) - set(expected))
        reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or reshaped:
            raise ValueError(
                f"{checkpoint} does not fit {timm_name}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shapes {reshaped[:3]}. Check the architecture and its arguments (e.g. num_classes)."
            )
        vit.load_state_dict({k: v for k, v in state.items() if k in expected})
        return vit
    if not pretrained:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    if allow_download:
        return _create_pretrained(timm_name, kwargs)
    # Passing the file through the pretrained config keeps timm's checkpoint filter (pos-embed resampling).
    return _create_pretrained(timm_name, kwargs, file=_find_in_hf_cache(timm_name))


def _create_pretrained(timm_name: str, kwargs: dict, **overlay) -> torch.nn.Module:
    """timm.create_model(pretrained=True), where a ``num_classes`` that differs from the weights' head raises
    (timm would otherwise silently replace the head with a random one)."""
    if "num_classes" in kwargs:
        overlay["num_classes"] = kwargs["num_classes"]
    try:
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as error:
        if "num_classes" not in kwargs or "size mismatch" not in str(error):
            raise
        raise ValueError(
            f"num_classes={kwargs['num_classes']} does not match the classifier of the {timm_name} weights. "
            "Drop num_classes to keep the trained head, or pass weights with that head as checkpoint=FILE."
        ) from error


def _find_in_hf_cache(timm_name: str) -> str:
    """The weights file of a timm model in the local Hugging Face cache, without any network call."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    cfg = get_pretrained_cfg(timm_name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise WeightsNotFoundError(
            f"timm has no hub weights for {timm_name!r}; pass checkpoint='/path/to/weights' or pretrained=False."
        )
    for filename in ("model.safetensors", "open_clip_model.safetensors"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    raise WeightsNotFoundError(
        f"The weights of {timm_name!r} are not in the Hugging Face cache ({HF_HUB_CACHE}): expected "
        f"{repo}/model.safetensors there. Download it where a network is available (e.g. "
        f"`hf download {repo}`), copy a save_for_hf folder and use 'local-dir:PATH', pass checkpoint=FILE, "
        "or load_model(..., allow_download=True)."
    )


def _read_state_dict(path: Path) -> dict:
    """Tensors only: safetensors, or torch.load(weights_only=True); prefixes like 'model.' are stripped.

    A file that is not such a checkpoint raises ValueError naming it; pickled objects other than tensors are
    refused, never unpickled."""
    if not path.is_file():
        raise WeightsNotFoundError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error}); expected weights written by "
                             "safetensors.torch.save_file (re-download it if it was cut short).") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if found is None:
                raise ValueError(f"{path} is not a readable PyTorch checkpoint: torch.load(weights_only=True) "
                                 "cannot parse it. Expected a state dict saved with torch.save.") from None
            raise ValueError(
                f"{path} holds a pickled object of type {found.group(1)}, not only tensors; vitlens reads "
                "checkpoints as tensors and never unpickles code. Convert the file once, where you trust it, into "
                "a state dict of tensors (safetensors.torch.save_file(state_dict, 'model.safetensors')) and "
                "load that.") from None
        except (RuntimeError, EOFError, OSError) as error:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(error).splitlines()[0]}); "
                             "expected a state dict saved with torch.save or a .safetensors file.") from None
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kinds = sorted({type(v).__name__ for v in (state.values() if isinstance(state, dict) else [state])})
        raise ValueError(f"{path} does not hold a state dict of tensors (found {', '.join(kinds)}); expected "
                         "{name: tensor}, optionally under 'state_dict', 'model' or 'module'.")
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def list_models() -> list[str]:
    """The zoo's nicknames with their notes, for ``--help`` and the README."""
    return [f"{name}: {entry.note} ({entry.timm_name})" for name, entry in ZOO.items()]
