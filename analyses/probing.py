"""Linear probes per layer and token position: how much class information a linear read-out finds (§A10).

vit-cls_emb compares the class-embedding projection with ridge probes trained on each token position of each
layer (±1 one-hot targets, ``sklearn Ridge(alpha=1.0, solver="lsqr")``, raw hidden vectors). The original
runs the model once per token position and fits one sklearn model per position; here the features of every
position and layer come from one forward per image (or from an :class:`~vitlens.ActivationStore` that holds
them), and the ridge solve is one batched Cholesky solve over positions on the device: the exact ridge
solution, which sklearn's lsqr only approaches (it stops at its default ``tol=1e-4``, about that far from it,
enough to swap near-tied classes).

- default: the exact solve in float32; a token's rank counts the classes scored strictly above the label.
- ``compat=True``: the original's numbers: one ``sklearn.linear_model.Ridge(alpha, solver="lsqr")`` per
  position at its default settings, on the float32 features as the original: its early-stopped lsqr solution,
  so a per-position sklearn loop over the same features gives the same scores (as slow as the original's fits,
  but still one forward per image). float32 lsqr at tol=1e-4 is touchy: features from another path (unfused
  attention, another batch size: last-bit changes) can move its scores by ~1e-3 and swap near-tied classes.
  Then the original's rank, the label's position in the sorted scores (ties in sort order,
  :func:`analyses.class_embedding.label_rank`); the original computes it as ``999 - position in the ascending
  argsort``, which hard-codes 1000 classes (not reproduced: ``C - 1`` is used).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from analyses.class_embedding import label_rank
from vitlens.store import METADATA_FILE, ActivationStore

HOOKS = ("hook_resid_post", "hook_attn_out", "hook_mlp_out")  # the original's hs-, attn- and mlp- layers


class Rows(Dataset):
    """Items `rows` of `dataset`, with the matching rows of ``dataset.samples`` (so it can be recorded)."""

    def __init__(self, dataset, rows: Sequence[int]):
        self.dataset, self.rows = dataset, [int(r) for r in rows]
        self.samples = dataset.samples.iloc[self.rows].reset_index(drop=True)
        self.data_config = getattr(dataset, "data_config", None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[self.rows[index]], "index": index}


def split_per_class(dataset, n_train: int) -> tuple[Rows, Rows]:
    """(train, test): the first `n_train` items of each class train the probe, the rest test it."""
    labels = np.asarray(dataset.samples["label"])
    first = pd.Series(labels).groupby(labels).cumcount().to_numpy() < n_train
    if first.all() or not first.any():
        raise ValueError(f"--train-per-class {n_train} leaves no {'test' if first.all() else 'train'} images; "
                         "pick a number below the images per class, or pass --train-data")
    return Rows(dataset, np.flatnonzero(first)), Rows(dataset, np.flatnonzero(~first))


def _hook_names(model, hook: str, layers: Sequence[int] | None) -> tuple[list[int], list[str]]:
    if hook not in HOOKS:
        raise ValueError(f"hook {hook!r} is not one of {HOOKS} (the residual stream and the sub-layer outputs)")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} are not in [0, {n_layers}) for {model.cfg.model_name}")
    return layers, [f"blocks.{layer}.{hook}" for layer in layers]


@torch.inference_mode()
def extract_features(model, data, *, hook: str = "hook_resid_post", layers: Sequence[int] | None = None,
                     batch_size: int = 64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every token position: ``(features [layers pos n d_model] float32 CPU, labels [n])``.

    `data` is a dataset of ``{"image", "label"}`` items (one forward per image, all layers and positions
    captured at once) or an :class:`~vitlens.ActivationStore` that recorded ``blocks.*.{hook}`` for all tokens.
    """
    layers, names = _hook_names(model, hook, layers)
    if isinstance(data, ActivationStore):
        missing = [name for name in names if name not in data]
        partial = [name for name in names if name in data and data[name].spec.tokens is not None]
        if missing or partial:
            raise KeyError(f"the store {data.path} lacks {missing or partial} for all tokens (it holds "
                           f"{data.keys()}); record them with `vitlens record ... --hook 'blocks.*.{hook}'`, "
                           "or ask for layers= that it holds")
        data.require_done(np.arange(len(data)))
        features = torch.stack([torch.from_numpy(np.asarray(data[name][:], dtype=np.float32)) for name in names])
        return features.transpose(1, 2).contiguous(), torch.tensor(data.samples["label"].to_numpy())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    parts, labels = {name: [] for name in names}, []

    def keep(activation, hook):
        parts[hook.name].append(activation.float().cpu())

    for batch in DataLoader(data, batch_size=batch_size):
        model.run_with_hooks(batch["image"].to(device), fwd_hooks=[(name, keep) for name in names])
        labels.append(torch.as_tensor(batch["label"]))
    features = torch.stack([torch.cat(parts[name]) for name in names])  # [layers n pos d]
    return features.transpose(1, 2).contiguous(), torch.cat(labels)


def ridge_fit(features: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, *,
              compat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an intercept for every leading index at once.

    Args:
        features: [*batch n d] (e.g. [pos n d_model]: one problem per position).
        targets: [n k] (shared by all problems).
        compat: sklearn's ``Ridge(alpha, solver="lsqr")`` at its defaults, one fit per problem, on the CPU.
    Returns ``(weight [*batch d k], bias [*batch k])`` minimising ``|X W + b - Y|^2 + alpha |W|^2`` (sklearn's
    ``Ridge(alpha)``). Default: exact, in float32, from the centred normal equations (``d x d``) or their dual
    (``n x n``), the smaller, on the features' device.
    """
    if compat:
        return _sklearn_lsqr(features, targets, alpha)
    X, Y = features.float(), targets.to(device=features.device, dtype=torch.float32)
    x_mean, y_mean = X.mean(-2, keepdim=True), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    n, d = X.shape[-2:]
    eye = torch.eye(min(n, d), device=X.device)
    if d <= n:
        weight = torch.cholesky_solve(Xc.mT @ Yc, torch.linalg.cholesky(Xc.mT @ Xc + alpha * eye))
    else:
        kernel = torch.linalg.cholesky(Xc @ Xc.mT + alpha * eye)
        weight = Xc.mT @ torch.cholesky_solve(Yc.expand(*X.shape[:-1], Y.shape[-1]), kernel)
    return weight, y_mean - (x_mean @ weight).squeeze(-2)


def _sklearn_lsqr(features: torch.Tensor, targets: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's probes: ``Ridge(alpha, solver="lsqr").fit`` per leading index of `features` [*batch n d]
    (float32 in, as the original's features), results on the features' device."""
    from sklearn.linear_model import Ridge

    X = features.detach().float().cpu().numpy()
    Y = targets.detach().cpu().numpy()
    fits = [Ridge(alpha=alpha, solver="lsqr").fit(x, Y) for x in X.reshape(-1, *X.shape[-2:])]
    weight = torch.from_numpy(np.stack([fit.coef_.T for fit in fits])).reshape(*X.shape[:-2], X.shape[-1], -1)
    bias = torch.from_numpy(np.stack([np.atleast_1d(fit.intercept_) for fit in fits])).reshape(*X.shape[:-2], -1)
    return weight.to(features.device), bias.to(features.device)


def probe_ranks(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], n_classes: int,
                *, alpha: float = 1.0, compat: bool = False, device=None) -> torch.Tensor:
    """Rank of the label under a probe per layer and position: long [layers n_test pos].

    `train` and `test` are ``(features [layers pos n d], labels [n])`` (:func:`extract_features`). Each
    layer's positions are solved in one batch on `device`; targets are -1 with +1 at the label.
    """
    (x_train, y_train), (x_test, y_test) = train, test
    device = torch.device(device or "cpu")
    targets = torch.full((len(y_train), n_classes), -1.0, device=device)
    targets[torch.arange(len(y_train)), y_train.to(device)] = 1.0
    ranks = []
    for layer in range(x_train.shape[0]):
        weight, bias = ridge_fit(x_train[layer].to(device), targets, alpha, compat=compat)
        scores = x_test[layer].to(device, weight.dtype) @ weight + bias[:, None]  # [pos n C]
        ranks.append(label_rank(scores.transpose(0, 1), y_test.to(device), compat=compat).cpu())
    return torch.stack(ranks)


def run(model, train, test, *, hook: str = "hook_resid_post", layers: Sequence[int] | None = None,
        compat: bool = False, alpha: float = 1.0, batch_size: int = 64, device=None) -> pd.DataFrame:
    """Probe every layer and token position: columns ``layer, token, accuracy, mean_rank``.

    `train` and `test` are datasets (one forward per image) or stores holding ``blocks.*.{hook}`` for all
    tokens. `accuracy` is the test top-1 accuracy of the probe (0-1), `mean_rank` the mean rank of the label
    (0 = top). `token` indexes the model's token layout (CLS first).
    """
    options = dict(hook=hook, layers=layers, batch_size=batch_size, device=device)
    layer_ids, _ = _hook_names(model, hook, layers)
    device = device or next(model.parameters()).device
    ranks = probe_ranks(extract_features(model, train, **options), extract_features(model, test, **options),
                        model.cfg.d_vocab, alpha=alpha, compat=compat, device=device)  # [layers n pos]
    n_layers, _, n_pos = ranks.shape
    return pd.DataFrame({
        "layer": np.repeat(layer_ids, n_pos),
        "token": np.tile(np.arange(n_pos), n_layers),
        "accuracy": (ranks == 0).double().mean(1).flatten().numpy(),
        "mean_rank": ranks.double().mean(1).flatten().numpy(),
    })


def plot(table: pd.DataFrame, value: str = "accuracy"):
    """Heat map of `value` (``accuracy`` or ``mean_rank``) over layers (rows) and token positions (columns)."""
    import plotly.express as px

    grid = table.pivot(index="layer", columns="token", values=value)
    fig = px.imshow(grid, aspect="auto", origin="lower", color_continuous_scale="Viridis",
                    labels={"x": "token (0 = CLS)", "y": "layer", "color": value})
    fig.update_layout(title=f"Linear probes: {value.replace('_', ' ')} per layer and token")
    return fig


def cli(args) -> None:
    """``vitlens analyze probes``: record the probe features of the train and test images into
    ``STORE/probe-train`` and ``STORE/probe-test`` (resumable), then probe every layer and token."""
    from pathlib import Path

    from analyses.class_embedding import load_inputs, write_tables
    from vitlens.data import load_dataset
    from vitlens.recorder import record

    model, data = load_inputs(args)
    for name in ("train", "test"):
        _check_probe_store(Path(args.store) / f"probe-{name}", args.hook)
    if args.train_data:
        train, test = load_dataset(args.train_data, model=model, n_per_class=args.train_per_class), data
    else:
        train, test = split_per_class(data, args.train_per_class)
    stores = [record(model, part, Path(args.store) / f"probe-{name}", hooks=f"blocks.*.{args.hook}",
                     dtype="float32", batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
              for name, part in (("train", train), ("test", test))]
    write_tables(args.store, {"probes": run(model, *stores, hook=args.hook, compat=args.compat, device=args.device)})


def _check_probe_store(path, hook: str) -> None:
    """A probe store of the CLI that holds another hook: a ValueError naming --hook (record() would only say
    that the output set differs)."""
    if not (path / METADATA_FILE).exists():
        return
    with ActivationStore(path) as store:
        held = sorted({name.split(".", 2)[-1] for name in store.keys() if name.startswith("blocks.")})
    if held and hook not in held:
        raise ValueError(f"{path} holds the probe features of {', '.join(held)}, not {hook}: pass --hook "
                         f"{held[0]} to probe them, or another --store for --hook {hook}")
