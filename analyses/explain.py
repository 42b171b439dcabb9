"""One interface over every explanation-map method: ``explain(model, images, method, target)``.

Each method lives in its own small module (as pytorch-grad-cam does) and registers itself here with
:func:`register`; :func:`explain` looks it up, checks its options and returns maps ``[batch, h, w]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable

# Modules that register methods; imported on the first lookup so that each method module can import this one.
METHOD_MODULES = ("analyses.rollout", "analyses.vit_cx", "analyses.saliency", "analyses.diffmask")


@dataclass(frozen=True)
class Method:
    """An explanation method.

    ``fn(model, images, target, *, compat=False, **options) -> maps [batch, h, w]`` with `target` a [batch]
    long tensor of classes. `resolution` is ``"tokens"`` (maps on the model's token grid) or ``"pixels"``
    (maps at the image resolution).
    """

    name: str
    fn: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)  # option name -> default
    resolution: str = "tokens"
    needs_grad: bool = False
    description: str = ""
    paper: str = ""


_METHODS: dict[str, Method] = {}


def register(name: str, *, options: dict[str, Any] | None = None, resolution: str = "tokens",
             needs_grad: bool = False, description: str = "", paper: str = "") -> Callable:
    """Decorator: register ``fn`` as explanation method `name`."""
    if resolution not in ("tokens", "pixels"):
        raise ValueError(f"resolution must be 'tokens' or 'pixels', got {resolution!r}")

    def decorate(fn: Callable) -> Callable:
        _METHODS[name] = Method(name, fn, dict(options or {}), resolution, needs_grad, description, paper)
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
