"""One interface over every explanation-map method: ``explain(model, images, method, target)``.

Attention rollout, gradient rollout and Chefer relevance (:mod:`analyses.rollout`), ViT-CX
(:mod:`analyses.vit_cx`), the class-embedding saliency and DiffMask each live in their own small module (as
pytorch-grad-cam does) and register themselves here with :func:`register`; :func:`explain` looks a method
up, checks the target and the options and returns maps ``[batch, h, w]``: on the token grid for attention
methods, at the image resolution for pixel methods. :func:`run` writes each method's maps into a store as
``map.<method>`` through the recorder (resumable, one shard per rank under torchrun), :func:`upsample`
brings token maps to pixels and :func:`plot` shows maps over their images. ``analyses.explain`` is both
this module and, called, the :func:`explain` function.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from vitlens.recorder import Computation

# Modules that register methods; imported on the first lookup so that each method module can import this one.
METHOD_MODULES = ("analyses.rollout", "analyses.vit_cx", "analyses.saliency", "analyses.diffmask")
RESOLUTIONS = ("tokens", "pixels")
TARGETS = ("label", "predicted")


class UnknownMethodError(ValueError, KeyError):
    """An explanation method that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class UnknownOptionError(ValueError, TypeError):
    """An option the method does not take (a TypeError, as any unexpected keyword); the message lists its options."""


@dataclass(frozen=True)
class Method:
    """An explanation method.

    ``fn(model, images, target, *, compat=False, **options) -> maps [batch, h, w]`` with `target` a [batch]
    long tensor of classes (or None when `own_target`: the method explains its own forward's top class,
    which saves a forward). `resolution` is ``"tokens"`` (maps on the model's token grid) or ``"pixels"``
    (maps at the image resolution). `options` maps each option to its default.
    """

    name: str
    fn: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)  # option name -> default
    resolution: str = "tokens"
    needs_grad: bool = False
    description: str = ""
    paper: str = ""
    own_target: bool = False

    def shape(self, model, image_size: Sequence[int] | None = None) -> tuple[int, int]:
        """(h, w) of this method's maps for `model` at `image_size` (default: the model's image size)."""
        image_size = tuple(image_size or model.image_size)
        if self.resolution == "pixels":
            return image_size
        return model.layout.with_grid(model.vit.patch_embed.dynamic_feat_size(image_size)).grid


_METHODS: dict[str, Method] = {}


def register(name: str, *, options: dict[str, Any] | None = None, resolution: str = "tokens",
             needs_grad: bool = False, description: str = "", paper: str = "", own_target: bool = False) -> Callable:
    """Decorator: register ``fn`` as explanation method `name` (see :class:`Method`)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")

    def decorate(fn: Callable) -> Callable:
        _METHODS[name] = Method(name, fn, dict(options or {}), resolution, needs_grad, description, paper, own_target)
        return fn

    return decorate


def methods() -> dict[str, Method]:
    """Every registered method, by name."""
    for module in METHOD_MODULES:
        try:
            import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a method module that is not written yet is skipped, nothing else
                raise
    return dict(_METHODS)


def get_method(name: str) -> Method:
    """The registered method `name`; :class:`UnknownMethodError` lists the valid names."""
    known = methods()
    if name not in known:
        raise UnknownMethodError(f"unknown explanation method {name!r}; registered methods: {', '.join(sorted(known))}")
    return known[name]


def check_options(method: Method, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method's defaults updated with `options`; :class:`UnknownOptionError` lists the valid options."""
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in method.options.items()) or "none"
        raise UnknownOptionError(f"method {method.name!r} has no option {', '.join(map(repr, unknown))}; "
                                 f"its options (with defaults): {valid}")
    return {**method.options, **options}


def resolve_target(target, batch: int, n_classes: int, device: torch.device | str,
                   logits: torch.Tensor | None = None) -> torch.Tensor:
    """`target` (None, an int or a [batch] tensor of classes) as a [batch] long tensor on `device`.

    None means the predicted class, read from `logits` [batch classes] (required then).
    """
    if target is None:
        if logits is None:
            raise ValueError("target=None needs the logits of a forward to take the predicted class")
        return logits.detach().argmax(-1).to(device)
    target = torch.as_tensor(target, device=device)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    target = target.long()
    if target.ndim == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or a [batch={batch}] tensor of classes, got shape {tuple(target.shape)}")
    if batch and not 0 <= int(target.min()) <= int(target.max()) < n_classes:
        raise ValueError(f"target classes must lie in [0, {n_classes}), got {target.tolist()}")
    return target


def explain(model, images: torch.Tensor, method: str, target=None, *, compat: bool = False,
            **options) -> torch.Tensor:
    """Explanation maps of `method` for `images` [batch C H W] -> [batch h w] float32.

    Args:
        model: a :class:`~vitlens.HookedViT`.
        images: preprocessed images on the model's device, of the model's input size (any size on
            ``dynamic_img_size`` models).
        method: a registered method name (:func:`methods`): "rollout", "grad_rollout", "chefer", "vit_cx", ...
        target: the class to explain, an int or a [batch] tensor; None = each image's predicted class.
        compat: reproduce the original implementation's numbers, quirks included (each method documents them).
        **options: the method's options (:attr:`Method.options`); unknown ones raise :class:`UnknownOptionError`.

    Returns:
        [batch h w]: the token grid (``model.layout_for(images).grid``) for ``resolution == "tokens"`` methods,
        the image size for ``"pixels"`` methods (ViT-CX).
    """
    spec = get_method(method)
    settings = check_options(spec, options)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [batch C H W], got {got}; add a batch axis with images[None]")
    if target is None and not spec.own_target:
        with torch.no_grad():
            target = model(images).argmax(-1)
    elif target is not None:
        target = resolve_target(target, len(images), model.cfg.d_vocab, images.device)
    maps = spec.fn(model, images, target, compat=compat, **settings)
    expected = (len(images), *spec.shape(model, images.shape[-2:]))
    if tuple(maps.shape) != expected:
        raise RuntimeError(f"method {method!r} returned maps {tuple(maps.shape)}, expected {expected}")
    return maps.float()


def upsample(maps: torch.Tensor, image_size: int | Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Maps [batch h w] -> [batch H W] at `image_size` (an int for square images, or (H, W)).

    ``"bilinear"`` (align_corners=False, as torchvision's Resize and cv2's resize that the original CLIs use)
    or ``"nearest"`` (each token's value over its whole patch).
    """
    modes = ("bilinear", "nearest")
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    if maps.ndim != 3:
        raise ValueError(f"maps must be [batch h w], got shape {tuple(maps.shape)}; add a batch axis with maps[None]")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps[:, None].float(), size=size, mode=mode, **extra)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# Maps into a store


class MapComputation(Computation):
    """``map.<method>``: one method's maps [h w] per sample, float32, computed on the recorder's device.

    `target` is ``"label"`` (the sample's label) or ``"predicted"`` (the model's top class).
    """

    dtype = "float32"

    def __init__(self, method: str, options: Mapping[str, Any] | None = None, compat: bool = False,
                 target: str = "label"):
        spec = get_method(method)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.method, self.options, self.compat, self.target = method, check_options(spec, options or {}), compat, target
        self.name = f"map.{method}"
        self.needs_grad = spec.needs_grad

    def shape(self, model) -> tuple[int, ...]:
        return tuple(get_method(self.method).shape(model))

    def compute(self, model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels if self.target == "label" else None
        return explain(model, images, self.method, target, compat=self.compat, **self.options)


def run(model, data, methods: str | Sequence[str], store, *, options: Mapping[str, Mapping[str, Any]] | None = None,
        compat: bool = False, target: str = "label", batch_size: int = 16, device=None, num_workers: int = 0,
        shard_size: int | None = None, progress: bool = True):
    """Write every method's maps over the dataset `data` into the store at `store` (``map.<method>`` outputs).

    The recorder (:func:`vitlens.record`) does the work: resumable (running again computes only the missing
    shards), a progress bar, and under ``torchrun`` each rank writes its own shards (shards s with
    s % WORLD_SIZE == RANK; `shard_size` samples each, default the recorder's). `options` maps a method
    name to its options. Returns a pandas DataFrame with one row per method: method, output, resolution,
    h, w, samples (recorded so far: all, unless other ranks are still writing), nan (maps with a NaN), compat,
    target, options.
    """
    import pandas as pd

    from vitlens.recorder import record

    names = [methods] if isinstance(methods, str) else list(methods)
    options = dict(options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"options given for {stray}, which are not among the methods {names}")
    computations = [MapComputation(name, options.get(name), compat, target) for name in names]
    opened = record(model, data, store, computations=computations, dtype="float32", batch_size=batch_size,
                    device=device, num_workers=num_workers, shard_size=shard_size, progress=progress)
    done = opened.done.nonzero()[0]  # one torchrun rank may return before the others have written theirs
    rows = []
    for computation in computations:
        spec = get_method(computation.method)
        h, w = computation.shape(model)
        nan = sum(int(torch.from_numpy(opened[computation.name][done[i:i + 256]]).isnan().flatten(1).any(1).sum())
                  for i in range(0, len(done), 256))
        rows.append({"method": computation.method, "output": computation.name, "resolution": spec.resolution,
                     "h": h, "w": w, "samples": len(done), "nan": nan, "compat": compat, "target": target,
                     "options": ", ".join(f"{k}={v}" for k, v in computation.options.items())})
    return pd.DataFrame(rows)


def parse_options(methods: Sequence[str], option_args: Sequence[str] = (), gates: str | None = None) -> dict:
    """``--option NAME=VALUE`` / ``--option METHOD.NAME=VALUE`` (and ``--gates PATH``) -> {method: {name: value}}.

    A plain NAME goes to every listed method that has that option; values are Python literals or else
    strings (``head_fusion=max``, ``discard_ratio=0.5``, ``layer=blocks.3.ln1.hook_normalized``).
    """
    import ast

    specs = {name: get_method(name) for name in methods}
    given = [(f"--option {text!r}", text) for text in option_args]
    if gates is not None:
        given.append((f"--gates {gates!r}", f"gates={gates!r}"))
    options: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for flag, text in given:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: write NAME=VALUE or METHOD.NAME=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        method, _, name = key.rpartition(".")
        targets = [method] if method else [m for m, spec in specs.items() if name in spec.options]
        if method and method not in specs:
            raise ValueError(f"{flag}: {method!r} is not among --methods {','.join(methods)}")
        if not targets or name not in specs[targets[0]].options:
            valid = {m: sorted(spec.options) for m, spec in specs.items()}
            raise ValueError(f"{flag}: no method in --methods {','.join(methods)} takes option {name!r}; "
                             f"their options: {valid}")
        for target in targets:
            options[target][name] = value
    return options


def cli(args) -> None:
    """``vitlens explain``: every method's maps into the store (resumable), then the summary table."""
    from analyses.class_embedding import write_tables
    from vitlens.data import load_dataset
    from vitlens.zoo import load_model

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise ValueError("--methods is empty; list methods such as rollout,chefer,vit_cx")
    for name in names:
        if name not in methods():
            raise ValueError(f"--methods: unknown method {name!r}; registered: {','.join(sorted(methods()))}")
    options = parse_options(names, args.option, args.gates)
    model = load_model(args.model)
    data = load_dataset(args.data, args.split, model=model, n_per_class=args.n_per_class)
    table = run(model, data, names, args.store, options=options, compat=args.compat, target=args.target,
                batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    write_tables(args.store, {"explain": table})


# ---------------------------------------------------------------------------------------------------------
# Plot


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] per leading item (NaN ignored; a constant item becomes 0)."""
    flat = x.float().flatten(1)
    finite = flat.nan_to_num(nan=float("inf"))
    low = finite.min(1, keepdim=True).values
    high = flat.nan_to_num(nan=float("-inf")).max(1, keepdim=True).values
    span = (high - low).clamp_min(1e-12)
    return ((flat - low) / span).reshape(x.shape)


def plot(maps, images: torch.Tensor, masks: torch.Tensor | None = None, opacity: float = 0.55):
    """A plotly figure: one row per image, the image then each method's map over it (min-max scaled).

    Args:
        maps: [batch h w] or a mapping {method name: [batch h w]} (token or pixel resolution; upsampled
            bilinearly to the image size for display).
        images: [batch C H W] the preprocessed images (shown min-max scaled per image).
        masks: optional object masks [batch h w] (token grid or pixels); their outline is drawn on every panel.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    maps = dict(maps) if isinstance(maps, Mapping) else {"map": maps}
    images = images.detach().cpu()
    batch, (H, W) = len(images), images.shape[-2:]
    for name, m in maps.items():
        if m.ndim != 3 or len(m) != batch:
            raise ValueError(f"maps {name!r} must be [batch={batch} h w], got shape {tuple(m.shape)}")
    rgb = (_scaled(images) * 255).round().byte().permute(0, 2, 3, 1)
    if rgb.shape[-1] == 1:
        rgb = rgb.expand(-1, -1, -1, 3)
    outline = None if masks is None else upsample(masks.detach().cpu().float(), (H, W), "nearest")
    fig = make_subplots(rows=batch, cols=1 + len(maps), column_titles=["image", *maps],
                        horizontal_spacing=0.01, vertical_spacing=0.01)
    for col, (name, m) in enumerate([("image", None), *maps.items()], start=1):
        shown = None if m is None else _scaled(upsample(m.detach().cpu().float(), (H, W)))
        for row in range(batch):
            fig.add_trace(go.Image(z=rgb[row].numpy(), hoverinfo="skip"), row=row + 1, col=col)
            if shown is not None:
                fig.add_trace(go.Heatmap(z=shown[row].numpy(), colorscale="Jet", opacity=opacity, zmin=0, zmax=1,
                                         showscale=False, name=name), row=row + 1, col=col)
            if outline is not None:
                fig.add_trace(go.Contour(z=outline[row].numpy(), contours=dict(start=0.5, end=0.5, coloring="none"),
                                         line=dict(color="white", width=2), showscale=False, hoverinfo="skip"),
                              row=row + 1, col=col)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(height=180 * batch + 40, width=180 * (1 + len(maps)), margin=dict(l=5, r=5, t=30, b=5),
                      showlegend=False)
    return fig


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`explain`: ``analyses.explain(model, images, "rollout")`` works whether
    ``analyses.explain`` resolves to the module (after ``import analyses.explain``) or to the function."""

    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
