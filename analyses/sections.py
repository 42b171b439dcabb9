"""The report's sections: each reads a :class:`vitlens.report.Study` and returns plotly figures.

A section shows what an analysis computed, through that analysis's own ``plot`` where it has one; the views
that need the images (token heatmaps with a layer slider, the attention viewer, maps over the image with the
mask outline) are built here from the stores. Sections are declared in :mod:`analyses.commands`.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

N_IMAGES = 4  # images shown in the per-image views


def image_rgb(study, index: int) -> np.ndarray | None:
    """uint8 [H W 3] of sample `index` of the study's dataset (un-normalised), or None without a dataset."""
    if study.data is None:
        return None
    item = study.data[index]
    image = item["image"].float()
    config = getattr(study.data, "data_config", None) or {}
    mean = np.asarray(config.get("mean", (0.5, 0.5, 0.5)), dtype=np.float32)[:, None, None]
    std = np.asarray(config.get("std", (0.5, 0.5, 0.5)), dtype=np.float32)[:, None, None]
    pixels = np.clip((image.numpy() * std + mean) * 255, 0, 255).astype(np.uint8)
    return pixels.transpose(1, 2, 0)


def token_mask(study, index: int) -> np.ndarray | None:
    """[grid_h grid_w] object mask of sample `index` (None without masks)."""
    if study.data is None:
        return None
    mask = study.data[index].get("token_mask")
    return None if mask is None else np.asarray(mask, dtype=np.float32)


def _grid_heatmap(values: np.ndarray, image: np.ndarray | None, **heatmap) -> list[go.BaseTraceType]:
    """Traces that draw [grid_h grid_w] `values` over `image` (stretched to the grid's extent)."""
    grid_h, grid_w = values.shape
    traces = []
    if image is not None:
        traces.append(go.Image(z=image, dx=grid_w / image.shape[1], dy=grid_h / image.shape[0],
                               x0=-0.5 + grid_w / image.shape[1] / 2, y0=-0.5 + grid_h / image.shape[0] / 2,
                               hoverinfo="skip"))
    traces.append(go.Heatmap(z=values, opacity=0.6 if image is not None else 1.0, **heatmap))
    return traces


def _outline(mask: np.ndarray | None) -> list[dict]:
    """Plotly shapes outlining the cells of a token mask (> 0.5)."""
    if mask is None:
        return []
    shapes, on = [], mask > 0.5
    rows, cols = on.shape
    for r in range(rows):
        for c in range(cols):
            if not on[r, c]:
                continue
            for inside, x0, y0, x1, y1 in ((r > 0 and on[r - 1, c], c - .5, r - .5, c + .5, r - .5),
                                           (r < rows - 1 and on[r + 1, c], c - .5, r + .5, c + .5, r + .5),
                                           (c > 0 and on[r, c - 1], c - .5, r - .5, c - .5, r + .5),
                                           (c < cols - 1 and on[r, c + 1], c + .5, r - .5, c + .5, r + .5)):
                if not inside:
                    shapes.append(dict(type="line", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color="white", width=2)))
    return shapes


def rank_heatmap(study, index: int = 0, output: str = "class_rank") -> go.Figure:
    """The label's rank of every patch token over the image, one frame per layer behind a slider.

    Hover shows the rank and, when the store has ``class_top5``, the token's top-5 classes.
    """
    store = study.store_with(output)
    layout = store.layout
    ranks = np.asarray(store[output][index])  # [layers tokens]
    top5 = np.asarray(store["class_top5"][index]) if "class_top5" in store.outputs else None
    patches = np.asarray(layout.tokens("patches"))
    grid = tuple(layout.grid)
    image, mask = image_rgb(study, index), token_mask(study, index)
    n_layers = ranks.shape[0]
    fig = go.Figure()
    per_layer = 2 if image is not None else 1
    for layer in range(n_layers):
        hover = None
        if top5 is not None:
            hover = np.array([", ".join(map(str, t)) for t in top5[layer, patches]]).reshape(grid)
        for trace in _grid_heatmap(ranks[layer, patches].reshape(grid).astype(float), image, colorscale="Viridis_r",
                                   zmin=0, zmax=float(ranks.max()), colorbar=dict(title="rank"),
                                   customdata=hover,
                                   hovertemplate="rank %{z}" + ("<br>top-5 %{customdata}" if hover is not None else "")
                                   + "<extra></extra>"):
            trace.visible = layer == n_layers - 1
            fig.add_trace(trace)
    steps = [dict(method="update", label=str(layer),
                  args=[{"visible": [t // per_layer == layer for t in range(n_layers * per_layer)]}])
             for layer in range(n_layers)]
    label = int(store.samples.label[index])
    fig.update_layout(title=f"{store.samples.sample_id[index]}: rank of label {label}",
                      sliders=[dict(active=n_layers - 1, steps=steps, currentvalue=dict(prefix="layer "))],
                      shapes=_outline(mask), height=520, width=560)
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    return fig


def attention_viewer(study, index: int = 0) -> go.Figure:
    """Attention of one query token over the image, with layer and head selectors (dropdowns).

    Reads ``blocks.{l}.attn.hook_pattern`` recorded for the CLS query (or all queries; the CLS row is shown).
    """
    names = [n for n in study.outputs("blocks.") if n.endswith("attn.hook_pattern")]
    store = study.store_with(names[0])
    layout, grid = store.layout, tuple(store.layout.grid)
    patches = np.asarray(layout.tokens("patches"))
    image = image_rgb(study, index)
    per = 2 if image is not None else 1
    fig, labels = go.Figure(), []
    for name in names:
        pattern = np.asarray(store[name][index])  # [head stored_queries key]; query 0: CLS when present
        for head in range(pattern.shape[0]):
            labels.append(f"{name.split('.')[1]}/{head}")
            for trace in _grid_heatmap(pattern[head, 0, patches].reshape(grid), image, colorscale="Magma",
                                       hovertemplate="attention %{z:.3f}<extra></extra>"):
                trace.visible = len(labels) == 1
                fig.add_trace(trace)
    buttons = [dict(method="update", label=f"layer/head {label}",
                    args=[{"visible": [t // per == i for t in range(len(labels) * per)]}])
               for i, label in enumerate(labels)]
    fig.update_layout(title=f"{store.samples.sample_id[index]}: attention of the first query",
                      updatemenus=[dict(buttons=buttons, direction="down", x=0, y=1.15, xanchor="left")],
                      height=520, width=560)
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    return fig


def table_html(frame, floatfmt: str = "{:.3f}") -> str:
    """A small DataFrame as an HTML table fragment."""
    return frame.to_html(index=False, classes="vitlens", border=0,
                         float_format=lambda v: floatfmt.format(v))


def token_views(study) -> list:
    """Token-rank heatmaps (layer slider) and the attention viewer for the first images."""
    store = study.store_with("class_rank")
    n = min(N_IMAGES, int(store.done.sum()))
    figures = [rank_heatmap(study, i) for i in range(n) if store.done[i]]
    if any(name.endswith("attn.hook_pattern") for name in study.outputs("blocks.")):
        figures.append(attention_viewer(study, 0))
    return figures
