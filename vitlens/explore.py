"""``vitlens explore STORE``: a Dash app over a store or study folder, read lazily.

Pick an image (by class or id), a layer, a head or an explanation method; the heatmaps read only that
sample's rows, so the app works on a multi-GB ImageNet-S cache. A dataset-level scatter (object size against
the label's identifiability, or against an explanation map's relevance mass) opens an image when a point is
clicked. It binds to localhost by default.
"""
from __future__ import annotations

import threading

import numpy as np
import plotly.graph_objects as go

from vitlens.report import Study, data_from_args


def image_stats(study: Study) -> dict[str, np.ndarray]:
    """Per-image values of the primary store's samples (:func:`primary`) for the scatter:
    ``identifiability`` (share of tokens with the label top-1 at the last layer, from ``class_rank``) and, with
    a dataset that has token masks, ``masks`` [n grid_h grid_w] (read once; NaN for samples not in the dataset)
    and ``object_fraction``."""
    store, stats = primary(study), {}
    if "class_rank" in store.outputs:
        parts = [(chunk[:, -1] == 0).mean(axis=-1) for _, chunk in store.iter_chunks("class_rank", 1024)]
        stats["identifiability"] = np.concatenate(parts) if parts else np.zeros(0)
    if study.data is not None and "token_mask" in study.data[0]:
        masks = np.full((len(store), *store.layout.grid), np.nan)
        for i in range(len(store)):
            item = study.item(store, i)
            if item is not None:
                masks[i] = np.asarray(item["token_mask"], dtype=np.float64)
        stats["masks"], stats["object_fraction"] = masks, masks.mean(axis=(1, 2))
    return stats


def primary(study: Study):
    """The store whose samples the explorer lists: the one with class ranks, else the outermost."""
    return study.store_with("class_rank") or next(iter(study.stores.values()))


def _heatmap(values: np.ndarray, title: str, colorscale: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=np.asarray(values, dtype=float).tolist(), colorscale=colorscale))
    fig.update_layout(title=title, height=380, width=420, margin=dict(l=20, r=20, t=40, b=20))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    return fig


def _note(text: str) -> go.Figure:
    return go.Figure(layout=dict(title=text, height=380, width=420))


def create_app(path, data=None):
    """The Dash app over the study at `path` (a store or a folder of stores). Images are picked by sample id;
    each store is read at that sample's row, so stores over different subsets of the data work together."""
    from dash import Dash, Input, Output, dcc, html

    study = Study(path, data=data)
    main = primary(study)
    samples = main.samples
    grid = tuple(main.layout.grid)
    patches = np.asarray(main.layout.tokens("patches"))
    ranks = main if "class_rank" in main.outputs else None
    patterns = [n for n in study.outputs("blocks.") if n.endswith("attn.hook_pattern")]
    maps = study.outputs("map.")
    stats = image_stats(study)
    cfg = main.meta["model"]["cfg"]
    n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
    options = [{"label": f"{sid} (class {label})", "value": str(sid)}
               for sid, label in zip(samples.sample_id, samples.label)]
    classes = sorted(set(int(c) for c in samples.label))

    app = Dash(__name__, title="vitlens explorer")
    app.layout = html.Div([
        html.H2(f"vitlens explorer: {study.path}"),
        html.Div([
            html.Label("class"), dcc.Dropdown([{"label": str(c), "value": c} for c in classes], id="class"),
            html.Label("image"), dcc.Dropdown(options, value=options[0]["value"], id="image", clearable=False),
            html.Label("layer"), dcc.Slider(0, n_layers - 1, 1, value=n_layers - 1, id="layer"),
            html.Label("head"), dcc.Dropdown(list(range(n_heads)), value=0, id="head", clearable=False),
            html.Label("method"), dcc.Dropdown(maps, value=maps[0] if maps else None, id="method"),
        ], style={"width": "30%", "display": "inline-block", "verticalAlign": "top"}),
        html.Div([dcc.Graph(id="ranks"), dcc.Graph(id="attention"), dcc.Graph(id="map")],
                 style={"width": "68%", "display": "inline-block"}),
        dcc.Graph(id="scatter"),
    ])

    def read(name: str, sample_id: str):
        """The stored row of `sample_id` for output `name`, or None when no store holds it."""
        for store in study.stores.values():
            row = study.row(store, sample_id) if name in store.outputs else None
            if row is not None and store.done[row]:
                return np.asarray(store[name][row])
        return None

    @app.callback(Output("image", "options"), Input("class", "value"))
    def filter_images(label):
        return options if label is None else [o for o, c in zip(options, samples.label) if int(c) == label]

    @app.callback(Output("image", "value"), Input("scatter", "clickData"), prevent_initial_call=True)
    def open_clicked(click):
        return str(click["points"][0]["customdata"])

    @app.callback(Output("ranks", "figure"), Input("image", "value"), Input("layer", "value"))
    def show_ranks(sample_id, layer):
        row = read("class_rank", sample_id) if ranks is not None else None
        if row is None:
            return _note("no class_rank for this image: run `vitlens analyze identifiability`")
        return _heatmap(row[int(layer), patches].reshape(grid), f"label rank, layer {layer}", "Viridis_r")

    @app.callback(Output("attention", "figure"), Input("image", "value"), Input("layer", "value"),
                  Input("head", "value"))
    def show_attention(sample_id, layer, head):
        name = f"blocks.{layer}.attn.hook_pattern"
        pattern = read(name, sample_id) if name in patterns else None
        if pattern is None:
            return _note(f"{name} was not recorded for this image")
        return _heatmap(pattern[int(head), 0, patches].reshape(grid), f"CLS attention, layer {layer} head {head}",
                        "Magma")

    @app.callback(Output("map", "figure"), Input("image", "value"), Input("method", "value"))
    def show_map(sample_id, method):
        values = read(method, sample_id) if method else None
        if values is None:
            return _note("no explanation map for this image: run `vitlens explain`")
        return _heatmap(values, method, "Inferno")

    @app.callback(Output("scatter", "figure"), Input("method", "value"))
    def show_scatter(method):
        has_masks = "object_fraction" in stats
        x = stats["object_fraction"] if has_masks else np.arange(len(samples), dtype=float)
        y, y_title = stats.get("identifiability"), "identifiability (last layer)"
        if method and has_masks:
            y, y_title = _relevance_mass(study, method, samples.sample_id, stats["masks"]), f"relevance mass of {method}"
        if y is None:
            y, y_title = np.full(len(samples), np.nan), "(nothing to show)"
        fig = go.Figure(go.Scatter(x=x, y=y, mode="markers", customdata=list(samples.sample_id),
                                   hovertemplate="%{customdata}<extra></extra>"))
        fig.update_layout(xaxis_title="object fraction" if has_masks else "sample", yaxis_title=y_title,
                          height=400, title="click a point to open its image")
        return fig

    return app


def _relevance_mass(study: Study, method: str, sample_ids, masks: np.ndarray) -> np.ndarray:
    """Share of each map's (non-negative) mass inside the object (`masks` > 0.5, one per sample id), on the
    token grid (pixel maps are averaged over each patch); NaN where the map or the mask is missing."""
    store = study.store_with(method)
    position = {str(s): i for i, s in enumerate(sample_ids)}
    masses = np.full(len(sample_ids), np.nan)
    for start, chunk in store.iter_chunks(method, 256):
        rows = [position.get(str(s)) for s in store.samples.sample_id[start:start + len(chunk)]]
        kept = [(k, row) for k, row in enumerate(rows) if row is not None]
        if not kept:
            continue
        maps = np.clip(chunk[[k for k, _ in kept]].astype(np.float64), 0, None)
        grid = masks.shape[1:]
        if maps.shape[1:] != grid:  # pixel-resolution maps: pool them to the token grid
            maps = maps.reshape(len(maps), grid[0], maps.shape[1] // grid[0], grid[1], -1).mean(axis=(2, 4))
        inside = masks[[row for _, row in kept]] > 0.5
        mass = (maps * inside).sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)
        missing = np.isnan(masks[[row for _, row in kept]]).any(axis=(1, 2))
        masses[[row for _, row in kept]] = np.where(missing, np.nan, mass)
    return masses


class Server:
    """The app served on `host:port` in a background thread (port 0: a free port); ``stop()`` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        from werkzeug.serving import make_server

        self._server = make_server(host, port, app.server, threaded=True)
        self.host, self.port = host, self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._server.serve_forever()

    def start(self) -> "Server":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(args) -> None:
    """``vitlens explore STORE [--data D] [--host H] [--port P]``: serve until Ctrl-C."""
    server = Server(create_app(args.store, data=data_from_args(args)), host=args.host, port=args.port)
    print(f"vitlens explorer on {server.url} (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
