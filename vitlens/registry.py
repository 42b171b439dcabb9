"""The analyses registry: how the mechanism finds the science without importing it.

``vitlens`` never imports ``analyses`` by name in its code paths (the dependency arrow points the other way).
Analyses declare themselves here instead, in one light module (:data:`PLUGINS`, ``analyses.commands``) that
imports neither torch nor the analyses themselves:

- :class:`Command`: a CLI command (``vitlens analyze NAME``, or a top-level one such as ``vitlens explain``)
  with a function that adds its arguments and a ``"module:function"`` target imported only when it runs, so
  that ``vitlens --help`` stays fast;
- :class:`Reducer` names: streaming reducers that ``vitlens record`` can add by name (``--class-rank``);
- :class:`Section`: a section of the HTML report, with the store outputs it needs and the command that
  computes them (named in the report when they are missing).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable

PLUGINS = ("analyses.commands",)


@dataclass(frozen=True)
class Command:
    """A CLI command. `group` is ``"analyze"`` for ``vitlens analyze NAME``, ``""`` for ``vitlens NAME``."""

    group: str
    name: str
    help: str
    target: str  # "module:function", called with the parsed argparse.Namespace
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None


@dataclass(frozen=True)
class Section:
    """A report section: `target` ("module:function") renders it from a store or study directory."""

    name: str
    title: str
    target: str
    requires: tuple[str, ...] = ()  # store outputs (or result tables) the section reads
    command: str = ""  # the command that computes them, named when they are missing
    order: int = 100


@dataclass
class _Registry:
    commands: dict[tuple[str, str], Command] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)
    reducers: dict[str, str] = field(default_factory=dict)
    loaded: bool = False


_REGISTRY = _Registry()


def command(group: str, name: str, help: str, target: str,
            arguments: Callable[[argparse.ArgumentParser], None] | None = None,
            description: str | None = None) -> Command:
    """Declare a CLI command (see :class:`Command`); a second declaration of the same name replaces the first."""
    cmd = Command(group, name, help, target, arguments, description)
    _REGISTRY.commands[group, name] = cmd
    return cmd


def section(name: str, title: str, target: str, requires: tuple[str, ...] = (), command: str = "",
            order: int = 100) -> Section:
    """Declare a report section (see :class:`Section`)."""
    sec = Section(name, title, target, tuple(requires), command, order)
    _REGISTRY.sections[name] = sec
    return sec


def reducer(name: str, target: str) -> None:
    """Declare a reducer class by name (``"class_rank"`` -> ``"analyses.class_embedding:ClassRankReducer"``)."""
    _REGISTRY.reducers[name] = target


def _discover() -> _Registry:
    if not _REGISTRY.loaded:
        _REGISTRY.loaded = True
        for plugin in PLUGINS:
            try:
                import_module(plugin)
            except ModuleNotFoundError as error:  # vitlens installed without its analyses
                if error.name is None or not plugin.startswith(error.name):
                    raise
    return _REGISTRY


def commands(group: str | None = None) -> list[Command]:
    """The declared commands (of one group), in declaration order."""
    return [c for c in _discover().commands.values() if group is None or c.group == group]


def sections() -> list[Section]:
    """The declared report sections, in report order."""
    return sorted(_discover().sections.values(), key=lambda s: s.order)


def get_reducer(name: str) -> type:
    """The reducer class declared as `name`."""
    reducers = _discover().reducers
    if name not in reducers:
        raise KeyError(f"no reducer named {name!r}; known: {sorted(reducers)}")
    return load(reducers[name])


def load(target: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module, _, attribute = target.partition(":")
    return getattr(import_module(module), attribute)
