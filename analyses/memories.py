"""Key-value memories of attention and MLP layers, read in class-embedding space (vit-cls_emb §A8).

A sub-layer's output is a sum of value vectors (columns of its output weights) weighted by coefficients:
fc1 before the activation (``mlp.hook_pre``) for the MLP, the concatenated heads' A·V (``attn.hook_z``
flattened, the input of ``attn.proj``) for attention. Projecting the values onto the class embeddings says
which class each memory writes (:func:`value_projection`); the study then asks whether classes own
dedicated memories (:func:`class_value_agreement`), whether a token's most active memories are those of its
class (:func:`key_value_agreement`) and whether they write the class the sub-layer predicts
(:func:`composition`). :func:`run` records each token's top-5 memories and the projected sub-layers' top-5
classes as on-device reducers, so every measure reads one small store.

Weights are read, never changed (the original normalises them in place, §A12.9, so a second call on the
same model saw other numbers). The output weights include LayerScale where the model has it (what is
really written into the stream); the study's models have none, so its numbers are unchanged.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import wilcoxon

from analyses.class_embedding import ProjectionReducer
from analyses.class_embedding import random_model as random_init
from vitlens.recorder import Reducer, record

KINDS = ("attn", "mlp")
TOP_K = 5
_COEFFICIENT_HOOKS = {"attn": "attn.hook_z", "mlp": "mlp.hook_pre"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (attention or MLP memories), got {kind!r}")


def output_weights(model, layer: int, kind: str) -> torch.Tensor:
    """The value vectors of a sub-layer: [memories d_model] (row j = value vector j).

    MLP: ``W_out`` [d_mlp d_model]; attention: ``W_O`` with heads flattened [n_heads*d_head d_model], matching
    the flattened ``hook_z`` coefficients. LayerScale folded in.
    """
    _check_kind(kind)
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is not in [0, {model.cfg.n_layers})")
    block = model.blocks[layer]
    return block.mlp.W_out if kind == "mlp" else block.attn.W_O.flatten(0, 1)


@torch.no_grad()
def value_projection(model, layer: int, kind: str) -> torch.Tensor:
    """[classes memories]: class embeddings · value vectors, ``P = W_U^T W_out^T`` (no bias, no norm, §A8).

    A new tensor; the model's weights are only read.
    """
    return (output_weights(model, layer, kind) @ model.W_U).T.float()


@torch.no_grad()
def value_cosines(model, layer: int, kind: str) -> torch.Tensor:
    """[classes memories]: cosine of each class embedding with each value vector (the study's normalised P)."""
    classes = torch.nn.functional.normalize(model.W_U.float(), dim=0)  # per class
    values = torch.nn.functional.normalize(output_weights(model, layer, kind).float(), dim=1)  # per memory
    return classes.T @ values.T


def memory_coefficients(activation: torch.Tensor, kind: str) -> torch.Tensor:
    """Coefficients [batch pos memories] from ``mlp.hook_pre`` [batch pos d_mlp] or ``attn.hook_z``
    [batch pos head d_head] (flattened: the input of ``attn.proj``)."""
    _check_kind(kind)
    return activation.flatten(-2) if kind == "attn" else activation


class MemoryTopKReducer(Reducer):
    """Indices of each token's `k` largest memory coefficients per layer: int16 [n, layers, tokens, k]."""

    dtype = "int16"

    def __init__(self, kind: str, k: int = TOP_K):
        _check_kind(kind)
        self.kind, self.k, self.name = kind, k, f"memory_top{k}_{kind}"

    def hooks(self, model) -> list[str]:
        return [f"blocks.{layer}.{_COEFFICIENT_HOOKS[self.kind]}" for layer in range(model.cfg.n_layers)]

    def shape(self, model) -> tuple[int, ...]:
        n_memories = model.cfg.d_mlp if self.kind == "mlp" else model.cfg.n_heads * model.cfg.d_head
        if n_memories > torch.iinfo(torch.int16).max:
            raise ValueError(f"{n_memories} memories do not fit the int16 indices of {self.name}")
        return model.cfg.n_layers, model.layout.n_tokens, self.k

    def reduce(self, model, activation, labels):
        """[batch pos ...] -> int16 [batch pos k]."""
        return memory_coefficients(activation, self.kind).topk(self.k, dim=-1).indices.to(torch.int16)


def reducers(k: int = TOP_K, *, compat: bool = False) -> list[Reducer]:
    """What :func:`run` records: each token's top-k memories (``memory_top5_{attn,mlp}``) and the top-5 classes
    of each projected sub-layer output (``class_top5_{attn,mlp}``, the class-embedding study's reducer, in
    float32: composition compares their first class with the memories' classes)."""
    return [*(MemoryTopKReducer(kind, k) for kind in KINDS),
            *(ProjectionReducer("top5", f"hook_{kind}_out", precision="float32", compat=compat) for kind in KINDS)]


def _top_memories(store, kind: str) -> str:
    names = [name for name in store.keys() if name.startswith("memory_top") and name.endswith(f"_{kind}")]
    if not names:
        raise KeyError(f"the store {store.path} has no memory_top5_{kind}; record it with "
                       "analyses.memories.run(model, data, store) or `vitlens analyze memories`")
    return names[0]


def _token_index(model, tokens: str | Sequence[int]) -> torch.Tensor | None:
    if isinstance(tokens, str) and tokens == "all":
        return None
    if isinstance(tokens, str) and tokens == "cls" and model.layout.cls_index is None:
        raise ValueError(f"tokens='cls' needs a class token, but {model.cfg.model_name} has none (average "
                         "pooling); use tokens='all' or 'patches'")
    if isinstance(tokens, str):
        return model.tokens(tokens)
    index = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    n_tokens = model.layout.n_tokens
    if not len(index) or not 0 <= int(index.min()) <= int(index.max()) < n_tokens:
        raise ValueError(f"tokens {index.tolist()} must be a non-empty list of layout indices in [0, {n_tokens}) "
                         "(e.g. model.tokens('patches')), not negative ones")
    return index


def _chunks(store, name: str, tokens: torch.Tensor | None, size: int = 1024):
    """``(start, long [<=size layers tokens k])`` of a reducer output, `tokens` selected along its axis 2
    (reducer outputs carry no token axis in the store's metadata, so the selection is done here)."""
    for start, chunk in store.iter_chunks(name, size):
        chunk = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
        yield start, chunk if tokens is None else chunk[:, :, tokens]


def key_value_agreement(store, model, kind: str, *, tokens: str | Sequence[int] = "all",
                        seed: int = 0) -> pd.DataFrame:
    """Per layer and class, the % of (image, token) pairs whose top-5 memories meet the class's top-5.

    The class's top-5 memories are the largest entries of its row of :func:`value_projection`. The random
    baseline uses the top-5 memories of a random class, drawn per layer and class from a generator seeded
    with `seed` (the original draws unseeded). `tokens`: "all", a token kind ("cls", "patches") or indices.
    Columns ``layer, class, rate, random_rate`` (rates in %).
    """
    store.check_model(model)
    name, index = _top_memories(store, kind), _token_index(model, tokens)
    labels = torch.tensor(store.samples["label"].to_numpy())
    n_classes, n_layers = model.cfg.d_vocab, model.cfg.n_layers
    class_top = torch.stack([value_projection(model, layer, kind).topk(TOP_K, dim=1).indices.cpu()
                             for layer in range(n_layers)])  # [layers classes 5]
    random_class = torch.randint(n_classes, (n_layers, n_classes), generator=torch.Generator().manual_seed(seed))
    hits = torch.zeros(2, n_layers, n_classes)
    for start, top in _chunks(store, name, index):  # top [n layers tokens k]
        y = labels[start:start + len(top)]
        for layer in range(n_layers):
            for row, classes in enumerate((y, random_class[layer][y])):
                reference = class_top[layer][classes]  # [n 5]
                agree = (top[:, layer, :, :, None] == reference[:, None, None, :]).any(-1).any(-1)  # [n tokens]
                hits[row, layer].index_add_(0, y, agree.sum(1).float())
    n_tokens = top.shape[2]
    count = torch.bincount(labels, minlength=n_classes).float() * n_tokens
    rates = (100 * hits / count).double()
    present = count > 0
    layer_ids, class_ids = torch.meshgrid(torch.arange(n_layers), torch.arange(n_classes)[present], indexing="ij")
    return pd.DataFrame({"layer": layer_ids.flatten().numpy(), "class": class_ids.flatten().numpy(),
                         "rate": rates[0][:, present].flatten().numpy(),
                         "random_rate": rates[1][:, present].flatten().numpy()})


def composition(store, model, kind: str, *, tokens: str | Sequence[int] = "all") -> pd.DataFrame:
    """Per layer, the % of tokens for which any of their top-5 memories' class (the argmax of the memory's
    column of :func:`value_projection`) is the top-1 class of the projected sub-layer output.

    Columns ``layer, rate`` (in %).
    """
    store.check_model(model)
    name, index = _top_memories(store, kind), _token_index(model, tokens)
    if f"class_top5_{kind}" not in store:
        raise KeyError(f"the store {store.path} has no class_top5_{kind}; record it with analyses.memories.run")
    memory_class = [value_projection(model, layer, kind).argmax(0).cpu() for layer in range(model.cfg.n_layers)]
    matches = torch.zeros(model.cfg.n_layers)
    total = 0
    predictions = _chunks(store, f"class_top5_{kind}", index)
    for (_, top), (_, predicted) in zip(_chunks(store, name, index), predictions):
        for layer, classes in enumerate(memory_class):
            matches[layer] += (classes[top[:, layer]] == predicted[:, layer, :, :1]).any(-1).sum()
        total += top.shape[0] * top.shape[2]
    return pd.DataFrame({"layer": np.arange(model.cfg.n_layers), "rate": (100 * matches / total).double().numpy()})


def class_value_agreement(model, *, random_model=None, kinds: Sequence[str] = KINDS, seed: int = 0) -> pd.DataFrame:
    """Per kind, layer and class, the top-1 cosine between the class embedding and any value vector.

    `random_model` (default: timm's random init of the same architecture, seeded with `seed`) gives the
    baseline; ``p_value`` (one per kind and layer) is the one-sided Wilcoxon signed-rank test, over classes,
    that the model's cosines exceed the random model's. Columns ``kind, layer, class, cosine, random_cosine, p_value``.
    """
    random_model = random_init(model, seed) if random_model is None else random_model
    rows = []
    for kind in kinds:
        for layer in range(model.cfg.n_layers):
            top1 = value_cosines(model, layer, kind).max(1).values.cpu().numpy()
            baseline = value_cosines(random_model, layer, kind).max(1).values.cpu().numpy()
            p_value = float(wilcoxon(top1, baseline, alternative="greater").pvalue)
            rows.append(pd.DataFrame({"kind": kind, "layer": layer, "class": np.arange(len(top1)), "cosine": top1,
                                      "random_cosine": baseline, "p_value": p_value}))
    return pd.concat(rows, ignore_index=True)


def run(model, data, store: str | os.PathLike, *, batch_size: int = 32, device=None, progress: bool = True,
        tokens: str | Sequence[int] = "all", seed: int = 0, compat: bool = False) -> pd.DataFrame:
    """Record the memories store of `model` over `data` at `store` (resumable), then measure it.

    Returns one row per kind and layer: ``kind, layer, class_value_cosine, random_cosine, p_value,
    key_value_rate, random_rate, composition_rate`` (cosines and agreement rates averaged over classes,
    rates in %). `compat` only reaches the class-embedding reducer (its tie order); the memories measures
    have no quirk of the original to reproduce besides the in-place normalisation, which is never done.
    """
    recorded = record(model, data, store, reducers=reducers(compat=compat), batch_size=batch_size, device=device,
                      progress=progress)
    values = class_value_agreement(model, seed=seed).groupby(["kind", "layer"], as_index=False).agg(
        class_value_cosine=("cosine", "mean"), random_cosine=("random_cosine", "mean"), p_value=("p_value", "first"))
    tables = []
    for kind in KINDS:
        agreement = key_value_agreement(recorded, model, kind, tokens=tokens, seed=seed).groupby(
            "layer", as_index=False)[["rate", "random_rate"]].mean()
        agreement = agreement.rename(columns={"rate": "key_value_rate"})
        composed = composition(recorded, model, kind, tokens=tokens).rename(columns={"rate": "composition_rate"})
        tables.append(agreement.merge(composed, on="layer").assign(kind=kind))
    return values.merge(pd.concat(tables), on=["kind", "layer"])


def plot(table: pd.DataFrame):
    """The :func:`run` table: key-value agreement (with its random baseline), composition and class-value
    cosines per layer, attention and MLP."""
    from plotly.subplots import make_subplots

    panels = [("key-value agreement (%)", ["key_value_rate", "random_rate"]),
              ("composition (%)", ["composition_rate"]),
              ("class-value top-1 cosine", ["class_value_cosine", "random_cosine"])]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[title for title, _ in panels])
    for col, (_, columns) in enumerate(panels, start=1):
        for kind, rows in table.groupby("kind"):
            for column in columns:
                fig.add_scatter(x=rows["layer"], y=rows[column], name=f"{kind} {column.replace('_', ' ')}",
                                mode="lines+markers", line_dash="dash" if column.startswith("random") else None,
                                row=1, col=col)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="Key-value memories in class-embedding space")
    return fig


def cli(args) -> None:
    """``vitlens analyze memories``: record the memories store (resumable), then the per-layer table."""
    from analyses.class_embedding import load_inputs, write_tables

    model, data = load_inputs(args)
    table = run(model, data, args.store, batch_size=args.batch_size, device=args.device,
                progress=not args.no_progress, compat=args.compat)
    write_tables(args.store, {"memories": table})
