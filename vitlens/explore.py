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

from vitlens.report import Study


def image_stats(study: Study) -> dict[str, np.ndarray]:
    """Per-image values for the scatter: ``identifiability`` (share of tokens with the label top-1 at the
    last layer, from ``class_rank``), ``object_fraction`` (from the dataset's token masks, when given)."""
    stats: dict[str, np.ndarray] = {}
    store = study.store_with("class_rank")
    if store is not None:
        parts = [(chunk[:, -1] == 0).mean(axis=-1) for _, chunk in store.iter_chunks("class_rank", 1024)]
        stats["identifiability"] = np.concatenate(parts) if parts else np.zeros(0)
    if study.data is not None and "token_mask" in study.data[0]:
        stats["object_fraction"] = np.array([float(np.asarray(study.data[i]["token_mask"]).mean())
                                             for i in range(len(study.data))])
    return stats


def _heatmap(values: np.ndarray, title: str, colorscale: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=np.asarray(values, dtype=float).tolist(), colorscale=colorscale))
    fig.update_layout(title=title, height=380, width=420, margin=dict(l=20, r=20, t=40, b=20))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    return fig


def create_app(path, data=None):
    """The Dash app over the study at `path` (a store or a folder of stores)."""
    from dash import Dash, Input, Output, dcc, html

    study = Study(path, data=data)
    first = next(iter(study.stores.values()))
    samples = first.samples
    layout = first.layout
    grid = tuple(layout.grid)
    patches = np.asarray(layout.tokens("patches"))
    ranks = study.store_with("class_rank")
    patterns = [n for n in study.outputs("blocks.") if n.endswith("attn.hook_pattern")]
    maps = study.outputs("map.")
    stats = image_stats(study)
    n_layers = ranks.outputs["class_rank"].shape[0] if ranks is not None else int(first.meta["model"]["cfg"]["n_layers"])
    n_heads = int(first.meta["model"]["cfg"]["n_heads"])
    options = [{"label": f"{sid} (class {label})", "value": i}
               for i, (sid, label) in enumerate(zip(samples.sample_id, samples.label))]
    classes = sorted(set(int(c) for c in samples.label))

    app = Dash(__name__, title="vitlens explorer")
    app.layout = html.Div([
        html.H2(f"vitlens explorer: {study.path}"),
        html.Div([
            html.Label("class"), dcc.Dropdown([{"label": str(c), "value": c} for c in classes], id="class"),
            html.Label("image"), dcc.Dropdown(options, value=0, id="image", clearable=False),
            html.Label("layer"), dcc.Slider(0, n_layers - 1, 1, value=n_layers - 1, id="layer"),
            html.Label("head"), dcc.Dropdown(list(range(n_heads)), value=0, id="head", clearable=False),
            html.Label("method"), dcc.Dropdown(maps, value=maps[0] if maps else None, id="method"),
        ], style={"width": "30%", "display": "inline-block", "verticalAlign": "top"}),
        html.Div([dcc.Graph(id="ranks"), dcc.Graph(id="attention"), dcc.Graph(id="map")],
                 style={"width": "68%", "display": "inline-block"}),
        dcc.Graph(id="scatter"),
    ])

    @app.callback(Output("image", "options"), Input("class", "value"))
    def filter_images(label):
        return options if label is None else [o for o, c in zip(options, samples.label) if int(c) == label]

    @app.callback(Output("image", "value"), Input("scatter", "clickData"), prevent_initial_call=True)
    def open_clicked(click):
        return int(click["points"][0]["customdata"])

    @app.callback(Output("ranks", "figure"), Input("image", "value"), Input("layer", "value"))
    def show_ranks(index, layer):
        if ranks is None:
            return go.Figure(layout=dict(title="no class_rank output: run `vitlens analyze identifiability`"))
        row = np.asarray(ranks["class_rank"][int(index)])[int(layer), patches].reshape(grid)
        return _heatmap(row, f"label rank, layer {layer}", "Viridis_r")

    @app.callback(Output("attention", "figure"), Input("image", "value"), Input("layer", "value"),
                  Input("head", "value"))
    def show_attention(index, layer, head):
        name = f"blocks.{layer}.attn.hook_pattern"
        if name not in patterns:
            return go.Figure(layout=dict(title=f"{name} was not recorded"))
        row = np.asarray(study.store_with(name)[name][int(index)])[int(head), 0, patches].reshape(grid)
        return _heatmap(row, f"CLS attention, layer {layer} head {head}", "Magma")

    @app.callback(Output("map", "figure"), Input("image", "value"), Input("method", "value"))
    def show_map(index, method):
        if not method:
            return go.Figure(layout=dict(title="no explanation maps: run `vitlens explain`"))
        return _heatmap(np.asarray(study.store_with(method)[method][int(index)]), method, "Inferno")

    @app.callback(Output("scatter", "figure"), Input("method", "value"))
    def show_scatter(method):
        x = stats.get("object_fraction", np.arange(len(samples), dtype=float))
        y, y_title = stats.get("identifiability"), "identifiability (last layer)"
        if method and "object_fraction" in stats:
            y, y_title = _relevance_mass(study, method, data), f"relevance mass of {method}"
        if y is None:
            y, y_title = np.zeros(len(samples)), "(nothing to show)"
        fig = go.Figure(go.Scatter(x=x[:len(y)], y=y, mode="markers", customdata=np.arange(len(y)),
                                   text=list(samples.sample_id[:len(y)]), hovertemplate="%{text}<extra></extra>"))
        fig.update_layout(xaxis_title="object fraction" if "object_fraction" in stats else "sample",
                          yaxis_title=y_title, height=400, title="click a point to open its image")
        return fig

    return app


def _relevance_mass(study: Study, method: str, data) -> np.ndarray:
    """Share of each map's (non-negative) mass inside the object, on the token grid."""
    store = study.store_with(method)
    masses = []
    for start, chunk in store.iter_chunks(method, 256):
        for i, m in enumerate(np.clip(chunk, 0, None)):
            mask = np.asarray(data[start + i]["token_mask"], dtype=np.float64)
            if m.shape != mask.shape:  # a pixel-resolution map: pool it to the token grid
                m = m.reshape(mask.shape[0], m.shape[0] // mask.shape[0], mask.shape[1], -1).mean(axis=(1, 3))
            masses.append(float((m * (mask > 0.5)).sum() / max(m.sum(), 1e-12)))
    return np.asarray(masses)


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
    data = None
    if args.data:
        from vitlens.data import load_dataset
        from vitlens.zoo import load_model

        first = next(iter(Study(args.store).stores.values()))
        data = load_dataset(args.data, model=load_model(args.model or first.tag))
    server = Server(create_app(args.store, data=data), host=args.host, port=args.port)
    print(f"vitlens explorer on {server.url} (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
