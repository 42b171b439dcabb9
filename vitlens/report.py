"""The offline HTML report: every registered analysis section, rendered from a store or a study folder.

A *study* is one store, or a folder of stores (what ``vitlens demo`` and the analyses' ``run`` functions
leave: the recording, its random twin, explanation maps, ...) with their result tables under
``<store>/results/*.csv``. Sections come from the analyses registry (:func:`vitlens.registry.sections`):
each names the store outputs or tables it reads and the command that computes them. The report renders
what it can and says, per missing section, which command computes it. plotly.js is inlined once, so the
file opens with no network.
"""
from __future__ import annotations

import html
import os
import traceback
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from vitlens import registry
from vitlens.store import METADATA_FILE, ActivationStore

RESULTS_DIR = "results"


class Study:
    """The stores under `path`: the path itself when it is a store, and every store in its sub-folders
    (an analysis keeps its own stores inside the recording's folder, e.g. ``results/evaluate/<method>``).

    Args:
        path: a store, or a folder of stores.
        data: the dataset the stores were recorded on (a :func:`vitlens.data.load_dataset` result), for
            views over the images; optional.
    """

    def __init__(self, path: str | os.PathLike, data=None):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a folder; pass a store or a folder of stores "
                                    "(e.g. cache/demo, written by `vitlens demo`)")
        folders = sorted((f.parent for f in self.path.glob("**/" + METADATA_FILE)),
                         key=lambda p: (len(p.relative_to(self.path).parts), str(p)))  # the outermost first
        if not folders:
            raise FileNotFoundError(f"{self.path} holds no vitlens store (no {METADATA_FILE} in it or its "
                                    "sub-folders); record one with `vitlens record` or `vitlens demo`")
        self.stores = {str(p.relative_to(self.path)): ActivationStore(p) for p in folders}
        self.data = data
        self._positions: dict[str, int] | None = None
        self._rows: dict[Path, dict[str, int]] = {}

    def store_with(self, *outputs: str) -> ActivationStore | None:
        """The first store that has every one of `outputs` (recorded for at least one sample), or None."""
        for store in self.stores.values():
            if all(name in store.outputs for name in outputs) and store.done.any():
                return store
        return None

    def item(self, store: ActivationStore, index: int) -> dict | None:
        """The dataset item of sample `index` of `store` (matched by sample id), or None (no dataset, or the
        sample is not in it)."""
        if self.data is None:
            return None
        if self._positions is None:
            self._positions = {str(s): i for i, s in enumerate(self.data.samples["sample_id"])}
        position = self._positions.get(str(store.samples.sample_id[index]))
        return None if position is None else self.data[position]

    def row(self, store: ActivationStore, sample_id: str) -> int | None:
        """The row of `sample_id` in `store`, or None when the store does not hold that sample."""
        rows = self._rows.setdefault(store.path, {str(s): i for i, s in enumerate(store.samples.sample_id)})
        return rows.get(str(sample_id))

    def outputs(self, prefix: str = "") -> list[str]:
        """Every output name in the study that starts with `prefix`."""
        return sorted({name for store in self.stores.values() for name in store.outputs if name.startswith(prefix)})

    @cached_property
    def tables(self) -> dict[str, Path]:
        """Result tables by name: ``<store>/results/<name>.csv`` of every store (and of the study folder)."""
        folders = [self.path / RESULTS_DIR] + [s.path / RESULTS_DIR for s in self.stores.values()]
        return {f.stem: f for folder in folders if folder.is_dir() for f in sorted(folder.glob("*.csv"))}

    def table(self, name: str) -> pd.DataFrame | None:
        """The result table `name`, or None when no analysis wrote it."""
        return pd.read_csv(self.tables[name]) if name in self.tables else None

    def has(self, requirement: str) -> bool:
        """``"table:NAME"`` is a result table; anything else a store output (a trailing ``*`` is a prefix)."""
        if requirement.startswith("table:"):
            return requirement[len("table:"):] in self.tables
        if requirement.endswith("*"):
            return bool(self.outputs(requirement[:-1]))
        return self.store_with(requirement) is not None

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def render_sections(study: Study) -> list[dict[str, Any]]:
    """Each registered section as ``{"name", "title", "figures", "missing"}``.

    ``missing`` is a sentence naming what is absent and the command that computes it (``figures`` is then
    empty). A section whose renderer fails is reported with the error rather than failing the report.
    """
    rendered = []
    for section in registry.sections():
        absent = [r for r in section.requires if not study.has(r)]
        entry = {"name": section.name, "title": section.title, "figures": [], "missing": None}
        if absent:
            entry["missing"] = (f"Not computed yet: {', '.join(absent)}. Run `{section.command}`."
                                if section.command else f"Not computed yet: {', '.join(absent)}.")
        else:
            try:
                entry["figures"] = list(registry.load(section.target)(study))
            except Exception as error:  # one broken section must not hide the others
                entry["missing"] = f"This section failed: {type(error).__name__}: {error}"
                entry["traceback"] = traceback.format_exc()
        rendered.append(entry)
    return rendered


def write_report(path: str | os.PathLike, out: str | os.PathLike | None = None, *, data=None,
                 title: str | None = None) -> Path:
    """Render the study at `path` into one self-contained HTML file (default ``<path>/report.html``)."""
    study = Study(path, data=data)
    try:
        sections = render_sections(study)
    finally:
        study.close()
    out = Path(out).expanduser() if out is not None else study.path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(to_html(sections, title or f"vitlens report: {study.path.name}"), encoding="utf-8")
    os.replace(tmp, out)
    return out


def to_html(sections: list[dict[str, Any]], title: str) -> str:
    """The report page: plotly.js inlined once, a table of contents, one ``<section>`` per section."""
    from plotly.offline import get_plotlyjs

    toc = "".join(f'<li><a href="#{s["name"]}">{html.escape(s["title"])}</a>'
                  f'{" (missing)" if s["missing"] else ""}</li>' for s in sections)
    body = []
    for s in sections:
        parts = [f'<section id="{s["name"]}" class="section"><h2>{html.escape(s["title"])}</h2>']
        if s["missing"]:
            parts.append(f'<p class="missing">{html.escape(s["missing"])}</p>')
        if s.get("traceback"):
            parts.append(f'<details><summary>traceback</summary><pre>{html.escape(s["traceback"])}</pre></details>')
        for i, figure in enumerate(s["figures"]):
            if isinstance(figure, str):  # a ready HTML fragment (a table)
                parts.append(f'<div class="fragment">{figure}</div>')
            else:
                parts.append(figure.to_html(full_html=False, include_plotlyjs=False,
                                            div_id=f'{s["name"]}-{i}', config={"displaylogo": False}))
        parts.append("</section>")
        body.append("".join(parts))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
section {{ border-top: 1px solid #ddd; padding-top: 1em; margin-top: 2em; }}
.missing {{ background: #fff6e0; border-left: 4px solid #e0a000; padding: .6em 1em; }}
table.vitlens {{ border-collapse: collapse; font-size: 90%; }}
table.vitlens td, table.vitlens th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<ul class="toc">{toc}</ul>
{"".join(body)}
</body></html>
"""


def data_from_args(args):
    """The dataset of ``--data`` under the preprocessing of ``--model`` (default: the model of the study's
    outermost store), or None without ``--data`` (the report and the explorer then show no images)."""
    if not args.data:
        return None
    from vitlens.data import load_dataset
    from vitlens.zoo import load_model

    study = Study(args.store)
    tag = next(iter(study.stores.values())).tag
    study.close()
    return load_dataset(args.data, model=load_model(args.model or tag))


def main(args) -> None:
    """``vitlens report STORE [--data D] [--model M] [--out FILE]``."""
    print(write_report(args.store, args.out, data=data_from_args(args)))
