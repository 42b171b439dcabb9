"""The report's sections: each reads a :class:`vitlens.report.Study` and returns plotly figures.

A section shows what an analysis computed, through that analysis's own ``plot`` where it has one; the views
that need the images (token heatmaps with a layer slider, the attention viewer, maps over the image with the
mask outline) are built here from the stores. Sections are declared in :mod:`analyses.commands`.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

N_IMAGES = 4  # images shown in the per-image views


def image_rgb(item: dict | None, data) -> np.ndarray | None:
    """uint8 [H W 3] of a dataset item's image (un-normalised with the dataset's mean and std), or None."""
    if item is None:
        return None
    config = getattr(data, "data_config", None) or {}
    mean = np.asarray(config.get("mean", (0.5, 0.5, 0.5)), dtype=np.float32)[:, None, None]
    std = np.asarray(config.get("std", (0.5, 0.5, 0.5)), dtype=np.float32)[:, None, None]
    pixels = np.clip((item["image"].float().numpy() * std + mean) * 255, 0, 255).astype(np.uint8)
    return pixels.transpose(1, 2, 0)


def token_mask(item: dict | None) -> np.ndarray | None:
    """[grid_h grid_w] object mask of a dataset item (None without masks)."""
    mask = None if item is None else item.get("token_mask")
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
    item = study.item(store, index)
    image, mask = image_rgb(item, study.data), token_mask(item)
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


def attention_viewer(study, index: int = 0) -> str:
    """Attention of one query token over the image: layer and head selectors, and a click on a token of the
    heatmap makes it the query (the CLS token is the query at first; "CLS" selects it again).

    Reads ``blocks.{l}.attn.hook_pattern``; with only the CLS query recorded, the CLS row is shown. Returns an
    HTML fragment: the figure, the selectors, and the attention rows of this image as JSON for the script.
    """
    import json

    names = sorted((n for n in study.outputs("blocks.") if n.endswith("attn.hook_pattern")),
                   key=lambda n: int(n.split(".")[1]))
    store = study.store_with(names[0])
    layout, grid = store.layout, tuple(store.layout.grid)
    patches = np.asarray(layout.tokens("patches"))
    rows = {}  # "layer/head/query" -> [grid_h grid_w] over the patch keys
    for name in names:
        pattern = np.asarray(store[name][index], dtype=np.float32)  # [head stored_queries key]
        queries = store[name].tokens if store[name].tokens is not None else range(pattern.shape[1])
        for head in range(pattern.shape[0]):
            for position, query in enumerate(queries):
                rows[f"{name.split('.')[1]}/{head}/{int(query)}"] = np.round(
                    pattern[head, position, patches].reshape(grid), 4).tolist()
    first_query = int(layout.cls_index) if layout.cls_index is not None else int(patches[0])
    image = image_rgb(study.item(store, index), study.data)
    fig = go.Figure(_grid_heatmap(np.asarray(rows[f"0/0/{first_query}"]), image, colorscale="Magma",
                                  hovertemplate="attention %{z:.3f}<extra>click: make this token the query</extra>"))
    fig.update_layout(title=f"{store.samples.sample_id[index]}: attention of the query token", height=520, width=560)
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    div = f"attention-{index}"
    heads = sorted({int(k.split("/")[1]) for k in rows})
    layers = [int(n.split(".")[1]) for n in names]
    options = lambda values: "".join(f'<option value="{v}">{v}</option>' for v in values)  # noqa: E731
    patch_tokens = json.dumps([int(t) for t in patches])
    return f"""<div class="attention-viewer">
<label>layer <select id="{div}-layer">{options(layers)}</select></label>
<label>head <select id="{div}-head">{options(heads)}</select></label>
<button id="{div}-cls" type="button">query: CLS</button> <span id="{div}-query">query token {first_query}</span>
{fig.to_html(full_html=False, include_plotlyjs=False, div_id=div)}
<script>(function() {{
  const rows = {json.dumps(rows)}, patches = {patch_tokens}, cols = {grid[1]};
  const gd = document.getElementById("{div}"), trace = gd.data.length - 1;
  let query = {first_query};
  function show() {{
    const key = document.getElementById("{div}-layer").value + "/" + document.getElementById("{div}-head").value
                + "/" + query;
    if (!(key in rows)) {{ document.getElementById("{div}-query").textContent = "query " + query + " not recorded"; return; }}
    Plotly.restyle(gd, {{z: [rows[key]]}}, [trace]);
    document.getElementById("{div}-query").textContent = "query token " + query;
  }}
  document.getElementById("{div}-layer").onchange = show;
  document.getElementById("{div}-head").onchange = show;
  document.getElementById("{div}-cls").onclick = function() {{ query = {first_query}; show(); }};
  gd.on("plotly_click", function(event) {{
    const p = event.points.find(p => p.curveNumber === trace);
    if (p) {{ query = patches[p.y * cols + p.x]; show(); }}
  }});
}})();</script></div>"""


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


def identifiability(study) -> list:
    """Identifiability per layer for CLS and image tokens, with the random twin dashed; the other measures."""
    from analyses import class_embedding

    figures = []
    table = study.table("identifiability")
    random = next((s for name, s in study.stores.items() if name.endswith("-random") and "class_rank" in s.outputs),
                  None)
    baseline = class_embedding.identifiability(random) if random is not None else None
    figures.append(class_embedding.plot(table, baseline=baseline, title="class identifiability per layer"))
    figures.append(class_embedding.plot(table, y="rate", title="identifiability rate (% of tokens ranked top-1)"))
    for name, title in (("change_rate", "residual updates that raise the label's logit"),
                        ("class_similarity_change", "sub-layers that raise the label's logit"),
                        ("residual_composition", "where the residual's top-1 class comes from"),
                        ("context_difference_identifiability", "class minus context tokens: identifiability")):
        frame = study.table(name)
        if frame is not None:
            figures.append(class_embedding.plot(frame, title=title))
    return figures


def perturbations(study) -> list:
    """Perturbed against unperturbed identifiability and accuracy (attention and context edits)."""
    import pandas as pd

    from analyses import perturbation

    tables = [t for t in (study.table("attention_perturbation"), study.table("context_perturbation")) if t is not None]
    table = pd.concat(tables, ignore_index=True)
    return [perturbation.plot(table, y="rate", title="identifiability rate at the last layer (%)"),
            perturbation.plot(table, y="accuracy", title="top-1 accuracy (%)"), table_html(table)]


def memories(study) -> list:
    """Key-value agreement, composition and class-value cosines per layer."""
    from analyses import memories as memories_

    return [memories_.plot(study.table("memories"))]


def probes(study) -> list:
    """Linear probes per layer and token, and the CLS probe against the class-embedding projection."""
    import plotly.express as px

    from analyses import probing

    table = study.table("probes")
    figures = [probing.plot(table)]
    ident = study.table("identifiability")
    if ident is not None:
        cls = ident[ident.tokens == "cls"]
        compare = px.line(x=list(cls["layer"]) * 2, y=list(table[table.token == 0]["accuracy"] * 100) + list(cls["rate"]),
                          color=["linear probe accuracy"] * len(cls) + ["projection: label ranked top-1"] * len(cls),
                          markers=True, labels={"x": "layer", "y": "% of images (CLS token)", "color": ""},
                          title="CLS token: linear probe against the class-embedding projection")
        figures.append(compare)
    return figures


def token_removal(study) -> list:
    """The keep-top-n token-removal curves and their AUCs."""
    from analyses import saliency

    return [saliency.plot(study.table("token_removal_curves")), table_html(study.table("perturbation_auc"))]


def explanation_maps(study) -> list:
    """Every method's maps over the first images, with the object outline."""
    import torch

    from analyses import explain

    names = study.outputs("map.")
    store = study.store_with(names[0])
    n = min(N_IMAGES, int(store.done.sum()))
    maps = {name[len("map."):]: torch.as_tensor(np.asarray(store[name][0:n]), dtype=torch.float32) for name in names}
    items = [study.item(store, i) for i in range(n)]
    if any(item is None for item in items):  # no dataset to show the maps over
        return [explain.plot(maps, torch.zeros(n, 3, *next(iter(maps.values())).shape[-2:]))]
    images = torch.stack([item["image"] for item in items])
    masks = torch.stack([torch.as_tensor(token_mask(item)) for item in items]) if "token_mask" in items[0] else None
    return [explain.plot(maps, images, masks)]


def benchmark(study) -> list:
    """The method x metric table with intervals, and the deletion and insertion curves."""
    from analyses import faithfulness

    folder = study.tables["evaluate"].parent.parent  # <maps store>/results/evaluate.csv
    summary = study.table("evaluate_summary")
    overall = summary[summary["group"] == "all"]
    cells = overall.assign(column=overall["metric"] + " (" + overall["level"] + ")",
                           cell=overall.apply(lambda r: f"{r['mean']:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]", axis=1))
    wide = cells.pivot(index="method", columns="column", values="cell").reset_index()
    table = faithfulness.plot(folder).update_layout(height=140 + 45 * len(wide), margin=dict(b=160))
    return [table, faithfulness.plot(folder, kind="curves"), table_html(wide)]
