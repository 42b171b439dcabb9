"""Class-embedding projection: every token at every layer read as class evidence (vit-cls_emb, §A4-A5).

A token's residual (or a sub-layer's output, alone) projected through the final norm and the classifier head
gives its class logits; the label's rank there says how far the token has built the class. The projections
are computed on the device during the recording, as :class:`~vitlens.recorder.Reducer` s, so dataset-scale
studies keep a few bytes per token and layer instead of an activation (:func:`run`). The study's measures
(identifiability, change rates, residual composition, class vs context tokens) then read such a store and
return tidy DataFrames; :func:`plot` draws any of them.

Where vit-cls_emb has a bug that changes a number (§A12), the default is correct and ``compat=True``
reproduces the original: rank ties (the label first vs a stable sort's order), the GAP model's first image
token (dropped by the original's ``[:, 1:]``) and residual composition's ``comp`` (which tests the attention
match twice and never the MLP's).
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from vitlens.recorder import Reducer

SOURCES = {"": "hook_resid_post", "_attn": "hook_attn_out", "_mlp": "hook_mlp_out"}
"""Store output suffix -> the hook projected: the residual after each block, and what each sub-layer adds
(``hook_attn_out``/``hook_mlp_out``: after LayerScale, or after the block's own norm for post-norm blocks,
as §A4 does for the GAP model)."""
PRECISIONS = ("auto", "float32", "bfloat16")
RECORD_HINT = ("record it with `vitlens analyze identifiability --model M --data D --store PATH` "
               "(analyses.class_embedding.run)")


# ---------------------------------------------------------------------------------------------------------
# Projection of tensors


def label_rank(logits: torch.Tensor, labels: torch.Tensor, *, compat: bool = False) -> torch.Tensor:
    """Rank of the label among the classes, int64 [batch pos] from logits [batch pos classes] (0 = top-1).

    Default: the number of classes with a strictly larger logit, so a tie places the label first.
    ``compat=True``: the position of the label in a stable descending argsort, as vit-cls_emb's
    ``argsort`` gives it (tied classes with a smaller index come first, §A12.12).
    """
    label_logit = logits.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1))
    rank = torch.count_nonzero(logits > label_logit, dim=-1)
    if compat:
        before = torch.arange(logits.shape[-1], device=logits.device) < labels.view(-1, 1, 1)
        rank = rank + torch.count_nonzero((logits == label_logit) & before, dim=-1)
    return rank


class Projection(NamedTuple):
    """The class-embedding projection of every token, reduced: rank, logit and top-5 of the label."""

    rank: torch.Tensor  # int16 [batch pos]
    logit: torch.Tensor  # float32 [batch pos], the label's logit
    top5: torch.Tensor  # int16 [batch pos 5], the five best classes, best first


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bfloat16"`` on CUDA or on a CPU with native bfloat16 (AMX or AVX512-BF16), else
    ``"float32"``; other values are checked and returned. Without native support the bfloat16 projection is
    slower than float32 (measured 0.21 of the forward vs 0.82)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bfloat16"
    return "bfloat16" if torch.device(device).type == "cpu" and _cpu_has_native_bfloat16() else "float32"


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bfloat16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, float32 is never slow
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def project(model, activation: torch.Tensor, labels: torch.Tensor, *, precision: str = "float32",
            compat: bool = False, top_k: int = 5) -> Projection:
    """Project [batch pos d_model] through ``model.final_norm`` and the head; reduce to the label's rank, logit
    and the `top_k` classes (:class:`Projection`; ``top_k=0`` skips them). Always outside any autocast of the
    forward. `compat` places ties as vit-cls_emb's sort does (:func:`label_rank`).

    ``precision="bfloat16"`` rounds the normed tokens and the head to bfloat16 and sums the products in
    float32, with the label's logit subtracted inside the product (see :func:`_bfloat16_differences`): the
    rank changes only for classes within about 1% of the label's logit, the top-5 order only among classes
    that close to each other, and the label's logit is that of the rounded operands.
    """
    precision = resolve_precision(precision, activation.device)
    with torch.autocast(activation.device.type, enabled=False):
        normed = model.final_norm(activation.float())
        if precision == "float32":
            logits = model.vit.head(normed)
            label_logit = logits.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(-1)
            rank = label_rank(logits, labels, compat=compat)
        else:
            logits, label_logit = _bfloat16_differences(normed, model.W_U, model.b_U, labels)
            above = logits > 0
            above.scatter_(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1), False)  # its own ~0
            rank = torch.count_nonzero(above, dim=-1)
        top5 = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    return Projection(rank.to(torch.int16), label_logit.float(), top5.to(torch.int16))


def _bfloat16_differences(normed: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bfloat16 [batch pos classes] ``z.W_c + b_c - L``, float32 [batch pos] L) for z, W, b rounded to bfloat16.

    One bfloat16 matmul computes the difference to L, the label's logit, for every class; L is computed from
    the same rounded operands (exact products, a float32 sum) and fed in as three bfloat16 parts against
    rows of ones. The matmul sums in float32; rounding its output to bfloat16 keeps the sign.
    """
    z, W, b = normed.bfloat16(), W_U.bfloat16(), b_U.bfloat16()
    label_columns = W.T[labels].float().unsqueeze(-1)  # [batch d_model 1]
    label_logit = torch.bmm(z.float(), label_columns).squeeze(-1) + b[labels].float()[:, None]
    parts, rest = [], -label_logit  # three bfloat16 parts hold a float32 exactly
    for _ in range(3):
        parts.append(rest.bfloat16())
        rest = rest - parts[-1].float()
    lhs = torch.cat([z, z.new_ones(*z.shape[:-1], 1), torch.stack(parts, -1)], -1)  # [batch pos d_model+4]
    rhs = torch.cat([W, b[None], W.new_ones(3, W.shape[1])])  # [d_model+4 classes]
    with _float32_bfloat16_sums(z.device):
        return lhs @ rhs, label_logit


@contextmanager
def _float32_bfloat16_sums(device: torch.device):
    """cuBLAS may add split-K partial sums of a bfloat16 matmul in bfloat16; forbid it (a global flag, restored)."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    allowed = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = allowed


# ---------------------------------------------------------------------------------------------------------
# Reducers


class ClassRankReducer(Reducer):
    """Rank of the label class under the class-embedding projection of every token at every layer.

    For layer l and token t, ``rank = #{classes c : unembed(resid[l, t])[c] > unembed(resid[l, t])[label]}``
    (0 = the label is the top class), with ``model.unembed`` = head(final_norm(resid)). Stored as int16
    ``[n_samples, n_layers, n_tokens]``: the per-token identifiability curves of vit-cls_emb at dataset
    scale, for 2 bytes per token and layer instead of a d_model vector. Tied classes do not count, so a
    tie places the label first (vit-cls_emb's unstable argsort places it anywhere among them).

    The projection costs a [d_model x classes] product per token and layer, about 10% of ViT-B's compute.
    ``precision`` says how it is computed, always outside any autocast of the forward:

    - ``"float32"`` (default): float32 logits, the ranks of vit-cls_emb.
    - ``"bfloat16"``: the normed tokens and the head rounded to bfloat16, products summed in float32
      (half the cost on a CPU with AMX; GPUs run it on their bfloat16 units). The label's logit is
      subtracted inside the product, so the sign of each difference is not rounded away and no bfloat16
      ties appear; a class can move across the label only when their float32 logits differ by less than
      ``2**-7 * (m_c + m_label)``, with ``m_c = sum_i |z_i W_ic| + |b_c|`` (about 1% of the logit scale).
    - ``"auto"``: bfloat16 where the hardware runs it natively (CUDA, AMX or AVX512-BF16), else float32
      (:func:`resolve_precision`); the default of :func:`run`.
    """

    dtype = "int16"
    PRECISIONS = PRECISIONS

    def __init__(self, hook: str = "hook_resid_post", name: str = "class_rank", precision: str = "float32"):
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {self.PRECISIONS}")
        self.hook, self.name, self.precision = hook, name, precision

    def hooks(self, model) -> list[str]:
        return [f"blocks.{layer}.{self.hook}" for layer in range(model.cfg.n_layers)]

    def shape(self, model) -> tuple[int, ...]:
        if model.cfg.d_vocab > torch.iinfo(torch.int16).max:
            raise ValueError(f"{model.cfg.d_vocab} classes do not fit the int16 ranks of {self.name}")
        return model.cfg.n_layers, model.layout.n_tokens

    def reduce(self, model, activation, labels):
        """[batch pos d_model] -> int16 [batch pos]."""
        return project(model, activation, labels, precision=self.precision, top_k=0).rank


class _SharedProjection:
    """One projection per activation, shared by the rank, logit and top-5 reducers of the same hook (they run
    one after the other on the same tensor, so the last result is all there is to keep)."""

    def __init__(self, precision: str, compat: bool):
        self.precision, self.compat = precision, compat
        self._last: tuple[torch.Tensor, Projection] | None = None

    def __call__(self, model, activation: torch.Tensor, labels: torch.Tensor) -> Projection:
        if self._last is None or self._last[0] is not activation:
            self._last = activation, project(model, activation, labels, precision=self.precision,
                                             compat=self.compat)
        return self._last[1]


class ProjectionReducer(ClassRankReducer):
    """One output of the class-embedding projection (``what``: "rank", "logit" or "top5") of one hook at every
    layer: int16 [n, layers, tokens], float32 [n, layers, tokens] or int16 [n, layers, tokens, 5]. Build the
    full set with :func:`projection_reducers`, which shares one projection between the three outputs."""

    KINDS = {"rank": ("class_rank", "int16"), "logit": ("class_logit", "float32"), "top5": ("class_top5", "int16")}

    def __init__(self, what: str, hook: str = "hook_resid_post", precision: str = "auto", compat: bool = False,
                 shared: _SharedProjection | None = None):
        if what not in self.KINDS:
            raise ValueError(f"unknown projection output {what!r}; expected one of {sorted(self.KINDS)}")
        suffix = {hook_name: s for s, hook_name in SOURCES.items()}.get(hook, f"_{hook}")
        super().__init__(hook, self.KINDS[what][0] + suffix, precision)
        self.what, self.dtype, self.compat = what, self.KINDS[what][1], compat
        self._shared = shared or _SharedProjection(precision, compat)

    def shape(self, model) -> tuple[int, ...]:
        return super().shape(model) + ((min(5, model.cfg.d_vocab),) if self.what == "top5" else ())

    def reduce(self, model, activation, labels):
        return getattr(self._shared(model, activation, labels), self.what)

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, "what": self.what, "hook": self.hook, "name": self.name,
                "precision": self.precision, "compat": self.compat}


def projection_reducers(*, precision: str = "auto", compat: bool = False) -> list[ProjectionReducer]:
    """The nine reducers of :func:`run`: rank, logit and top-5 of the residual, attention and MLP outputs."""
    reducers = []
    for hook in SOURCES.values():
        shared = _SharedProjection(precision, compat)
        reducers += [ProjectionReducer(what, hook, precision, compat, shared) for what in ProjectionReducer.KINDS]
    return reducers


# ---------------------------------------------------------------------------------------------------------
# Recording


def random_twin_path(path: str | os.PathLike) -> Path:
    """Where :func:`run` records the random twin of the store at `path`: the sibling ``<path>-random``."""
    path = Path(path)
    return path.with_name(path.name + "-random")


def random_model(model, seed: int = 0):
    """A copy of `model` with timm's own random init (``VisionTransformer.init_weights``, seeded; the global
    RNG is left as it was): the study's ``pretrained=False`` baseline, with the same architecture, head
    size and preprocessing. Tagged ``<tag>-random``."""
    import copy

    from vitlens import HookedViT

    vit = copy.deepcopy(model.vit)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        vit.init_weights()
    return HookedViT.from_timm(vit, tag=f"{model.tag}-random")


def run(model, data, store: str | os.PathLike, *, compat: bool = False, random_twin: bool = False,
        batch_size: int = 32, device: str | torch.device | None = None, precision: str = "auto",
        seed: int = 0, progress: bool = True, **record_options):
    """Record the study's projections of every token at every layer into the store at `store` (resumable).

    One forward per image and no activation kept: for the residual after each block and for each
    sub-layer's output alone (projected through the final norm, §A4), the outputs

    - ``class_rank``, ``class_rank_attn``, ``class_rank_mlp``: int16 [n, layers, tokens], the label's rank
      (0 = top-1);
    - ``class_logit``, ``class_logit_attn``, ``class_logit_mlp``: float32 [n, layers, tokens], its logit;
    - ``class_top5``, ``class_top5_attn``, ``class_top5_mlp``: int16 [n, layers, tokens, 5];
    - ``hook_logits``: float32 [n, classes], the model's logits;

    computed on the device (``precision``: see :class:`ClassRankReducer`; "auto" = bfloat16 only where the
    hardware runs it natively). ``compat=True`` ranks ties as vit-cls_emb's sort (:func:`label_rank`).
    ``random_twin=True`` also records :func:`random_model` (seeded with `seed`) over the same data into
    ``<store>-random`` (:func:`random_twin_path`), the baseline of :func:`compare_to_random`. Running again
    finishes only the missing images. Other keyword arguments go to :func:`vitlens.record`.

    Returns the store (an :class:`~vitlens.ActivationStore`).
    """
    from vitlens.recorder import record

    resolve_precision(precision, "cpu")  # checked before anything runs
    options = dict(hooks={"hook_logits": "all"}, dtype="float32", batch_size=batch_size, device=device,
                   progress=progress, **record_options)
    if random_twin:
        record(random_model(model, seed), data, random_twin_path(store),
               reducers=projection_reducers(precision=precision, compat=compat), **options).close()
    return record(model, data, store, reducers=projection_reducers(precision=precision, compat=compat), **options)


# ---------------------------------------------------------------------------------------------------------
# Measures over a store


def _open(store):
    from vitlens import ActivationStore

    return store if hasattr(store, "iter_chunks") else ActivationStore(store)


def _chunks(store, names: list[str], size: int = 1024):
    """Aligned chunks ``{name: array [<=size, ...]}`` of several outputs; a missing output names the command."""
    for name in names:
        if name not in store:
            raise KeyError(f"{store.path} has no {name!r} output; {RECORD_HINT}")
    iterators = [store.iter_chunks(name, size) for name in names]
    for parts in zip(*iterators):
        yield {name: array for name, (_, array) in zip(names, parts)}


def _n_classes(store) -> int:
    return int(store.meta["model"]["cfg"]["d_vocab"])


def token_sets(store, *, compat: bool = False) -> dict[str, np.ndarray]:
    """``{"cls": [cls index], "image": patch indices}`` of a store's layout ("cls" only with a class token).

    ``compat=True`` takes the image tokens as every column but the first, as vit-cls_emb's ``[:, 1:]``
    does; for a model without a class token (the GAP model) that drops a real image token (§A12.3).
    """
    layout = store.layout
    sets = {} if layout.cls_index is None else {"cls": np.array([layout.cls_index])}
    sets["image"] = np.arange(1, layout.n_tokens) if compat else layout.tokens("patches").numpy()
    return sets


def identifiability(store, *, compat: bool = False, blocks: int | None = None) -> pd.DataFrame:
    """Class identifiability per layer and token set (§A5), from ``class_rank``.

    One row per (layer, tokens), tokens "cls" or "image", columns ``layer, tokens, rate, images_with_one,
    mean_identifiability``: rate = % of the tokens with rank 0, averaged over images; images_with_one = %
    of images with at least one such token; mean_identifiability = the mean of r = 1 - rank/C. For the last
    layer's CLS token of a CLS-pooling model the rate is the top-1 accuracy. `blocks` averages consecutive
    layers into that many "normalised blocks" (``blocks=12`` for ViT-L's 24, as the study plots it).
    `compat`: image tokens as in :func:`token_sets`.
    """
    store = _open(store)
    sets, n_classes = token_sets(store, compat=compat), _n_classes(store)
    sums = {kind: np.zeros((3, store.meta["model"]["cfg"]["n_layers"])) for kind in sets}
    for chunk in _chunks(store, ["class_rank"]):
        ranks = chunk["class_rank"].astype(np.int64)  # [n layers tokens]
        for kind, tokens in sets.items():
            selected = ranks[:, :, tokens]
            top = selected == 0
            sums[kind] += [top.mean(-1).sum(0), top.any(-1).sum(0), (1 - selected / n_classes).mean(-1).sum(0)]
    rows = []
    for kind, (rate, one, mean) in sums.items():
        for layer in range(len(rate)):
            rows.append({"layer": layer, "tokens": kind, "rate": 100 * rate[layer] / len(store),
                         "images_with_one": 100 * one[layer] / len(store),
                         "mean_identifiability": mean[layer] / len(store)})
    table = pd.DataFrame(rows)
    return table if blocks is None else _normalise_blocks(table, blocks)


def _normalise_blocks(table: pd.DataFrame, blocks: int) -> pd.DataFrame:
    """Average consecutive layers into `blocks` groups (ViT-L's 24 layers -> 12 normalised blocks)."""
    n_layers = table["layer"].max() + 1
    if blocks < 1 or n_layers % blocks:
        raise ValueError(f"blocks={blocks} must divide the {n_layers} layers into equal groups")
    table = table.assign(layer=table["layer"] // (n_layers // blocks))
    return table.groupby(["layer", "tokens"], sort=False, as_index=False).mean()


def _identifiability_values(store, tokens: np.ndarray) -> np.ndarray:
    """r = 1 - rank/C, float64 [n layers len(tokens)]."""
    ranks = np.concatenate([c["class_rank"][:, :, tokens] for c in _chunks(store, ["class_rank"])])
    return 1 - ranks / _n_classes(store)


def compare_to_random(store, random_store, *, compat: bool = False) -> pd.DataFrame:
    """Per layer and token set: is r above that of the random twin? One-sided Wilcoxon signed-rank test of the
    paired, flattened r (images x tokens) against ``random_store`` (same images, e.g. ``run(...,
    random_twin=True)``), as the study's identifiability plot does. Columns ``layer, tokens, mean,
    random_mean, statistic, p_value``."""
    from scipy.stats import wilcoxon

    store, random_store = _open(store), _open(random_store)
    if store.meta["samples"] != random_store.meta["samples"] or store.layout != random_store.layout:
        raise ValueError(f"{random_store.path} does not hold the samples and token layout of {store.path}; "
                         "record the twin with run(..., random_twin=True)")
    rows = []
    for kind, tokens in token_sets(store, compat=compat).items():
        r, r_random = _identifiability_values(store, tokens), _identifiability_values(random_store, tokens)
        for layer in range(r.shape[1]):
            x, y = r[:, layer].ravel(), r_random[:, layer].ravel()
            statistic, p_value = wilcoxon(x, y, alternative="greater") if (x != y).any() else (np.nan, 1.0)
            rows.append({"layer": layer, "tokens": kind, "mean": x.mean(), "random_mean": y.mean(),
                         "statistic": float(statistic), "p_value": float(p_value)})
    return pd.DataFrame(rows)


def change_rate(store, *, compat: bool = False) -> pd.DataFrame:
    """How often a block raises the label's logit (§A5 "change rate"): for layers l >= 1, the % of (image,
    image token) pairs where ``class_logit[l] > class_logit[l - 1]``. Columns ``layer, rate``.
    `compat`: image tokens as in :func:`token_sets`."""
    store = _open(store)
    tokens = token_sets(store, compat=compat)["image"]
    up = count = 0
    for chunk in _chunks(store, ["class_logit"]):
        logit = chunk["class_logit"][:, :, tokens]
        up = up + (logit[:, 1:] > logit[:, :-1]).sum((0, 2))
        count += logit.shape[0] * logit.shape[2]
    return pd.DataFrame({"layer": np.arange(1, len(up) + 1), "rate": 100 * up / count})


def class_similarity_change(store, *, compat: bool = False) -> pd.DataFrame:
    """How often a sub-layer's output alone scores the label higher than the residual it reads (§A5): for layers
    l >= 1, the % of tokens with ``class_logit_{attn|mlp}[l] - class_logit[l - 1] > 0``, per token set. As in
    the study, the MLP is compared with the residual before the block too (not the post-attention stream).
    Columns ``layer, sublayer, tokens, rate``."""
    store = _open(store)
    sets = token_sets(store, compat=compat)
    counts = {}
    for chunk in _chunks(store, ["class_logit", "class_logit_attn", "class_logit_mlp"]):
        previous = chunk["class_logit"][:, :-1]
        for sublayer in ("attn", "mlp"):
            diff = chunk[f"class_logit_{sublayer}"][:, 1:] - previous  # [n layers-1 tokens]
            for kind, tokens in sets.items():
                up, n = counts.get((sublayer, kind), (0, 0))
                counts[sublayer, kind] = up + (diff[:, :, tokens] > 0).sum((0, 2)), n + len(diff) * len(tokens)
    return pd.DataFrame([{"layer": layer + 1, "sublayer": sublayer, "tokens": kind, "rate": 100 * up[layer] / n}
                         for (sublayer, kind), (up, n) in counts.items() for layer in range(len(up))])


def residual_composition(store, *, tokens: str = "all", compat: bool = False) -> pd.DataFrame:
    """Which part of a block its top-1 class comes from (§A5 "residual match"): for layers l >= 1, the % of
    tokens whose top-1 class of the residual ``class_top5[l]`` equals that of the attention output ('attn'),
    of the MLP output ('mlp') and of the previous residual ('prev'); 'comp' is the % matching none of them
    (a class composed by the sum). `tokens`: "all", "cls" or "image".

    ``compat=True`` reproduces the study's 'comp', which tests the attention match twice and never the MLP
    (§A12.2), so it also counts the tokens whose top-1 comes from the MLP alone; its "image" tokens are as
    in :func:`token_sets`. Columns ``layer, attn, mlp, prev, comp``.
    """
    store = _open(store)
    sets = {"all": np.arange(store.layout.n_tokens), **token_sets(store, compat=compat)}
    if tokens not in sets:
        raise ValueError(f"tokens={tokens!r} must be one of {sorted(sets)} for this store")
    index = sets[tokens]
    totals, count = np.zeros((4, store.meta["model"]["cfg"]["n_layers"] - 1)), 0
    for chunk in _chunks(store, ["class_top5", "class_top5_attn", "class_top5_mlp"]):
        top1 = {name: chunk[name][:, :, index, 0] for name in chunk}
        resid = top1["class_top5"][:, 1:]
        attn, mlp = resid == top1["class_top5_attn"][:, 1:], resid == top1["class_top5_mlp"][:, 1:]
        prev = resid == top1["class_top5"][:, :-1]
        comp = ~(attn | prev) if compat else ~(attn | mlp | prev)
        totals += np.stack([m.sum((0, 2)) for m in (attn, mlp, prev, comp)])
        count += resid.shape[0] * resid.shape[2]
    table = pd.DataFrame(100 * totals.T / count, columns=["attn", "mlp", "prev", "comp"])
    return table.assign(layer=np.arange(1, len(table) + 1))[["layer", "attn", "mlp", "prev", "comp"]]


CONTEXT_MEASURES = ("identifiability", "attn", "mlp")


def object_masks(data, *, threshold: float = 0.0) -> np.ndarray:
    """bool [n patches]: the object tokens of each item (``token_mask > threshold``, flattened row-major).

    With ``mask_resize="area"`` the masks hold object fractions, and ``> 0`` calls a patch with any object
    pixel an object token; nearest masks are 0/1."""
    masks = []
    for i in range(len(data)):
        item = data[i]
        if "token_mask" not in item:
            raise ValueError("the dataset has no token masks (item['token_mask']); context perturbation and "
                             "class vs context tokens need segmentation masks: use ImageNet-S or the scenes")
        masks.append(np.asarray(item["token_mask"]).reshape(-1) > threshold)
    return np.stack(masks)


def context_difference(store, data, *, measure: str = "identifiability", n_permutations: int = 300,
                       seed: int = 0, compat: bool = False, threshold: float = 0.0) -> pd.DataFrame:
    """Class (object) vs context image tokens, per layer (§A5 ``compute_context_diff``, §A11).

    measure "identifiability": r = 1 - rank/C of each image token at every layer; "attn" or "mlp": the change
    of the label's logit that the sub-layer alone brings, ``class_logit_{attn|mlp}[l] - class_logit[l - 1]``
    for layers l >= 1. The statistic is mean(object tokens) - mean(context tokens) over all images; the
    p-value is the fraction of `n_permutations` shuffles of the object/context labels (over all image
    tokens, seeded) whose difference is larger. Masks come from `data` (``token_mask > threshold``), in the
    store's sample order. Columns ``layer, difference, p_value``.
    """
    store = _open(store)
    if measure not in CONTEXT_MEASURES:
        raise ValueError(f"measure={measure!r} must be one of {CONTEXT_MEASURES}")
    samples = getattr(data, "samples", None)
    if samples is None or [str(s) for s in samples["sample_id"]] != store.meta["samples"]["sample_id"]:
        raise ValueError(f"the dataset's samples are not those of {store.path}; pass the dataset it was "
                         "recorded from")
    layout = store.layout
    is_object = object_masks(data, threshold=threshold)  # [n patches]
    tokens = token_sets(store, compat=compat)["image"]
    is_object = is_object[:, tokens - layout.n_prefix]
    if measure == "identifiability":
        values, first = _identifiability_values(store, tokens), 0
    else:
        names = ["class_logit", f"class_logit_{measure}"]
        parts = [(c[names[1]][:, 1:] - c[names[0]][:, :-1])[:, :, tokens] for c in _chunks(store, names)]
        values, first = np.concatenate(parts), 1
    values = values.transpose(0, 2, 1).reshape(-1, values.shape[1])  # [(image token) layers]
    labels = is_object.reshape(-1)
    n_object = int(labels.sum())
    if not 0 < n_object < len(labels):
        raise ValueError("the masks put every image token on one side (object or context); nothing to compare")
    observed = _mean_difference(values, labels, n_object)
    rng = np.random.default_rng(seed)
    larger = np.zeros(values.shape[1])
    for _ in range(n_permutations):
        larger += _mean_difference(values, rng.permutation(labels), n_object) > observed
    return pd.DataFrame({"layer": np.arange(first, first + values.shape[1]), "difference": observed,
                         "p_value": larger / max(n_permutations, 1)})


def _mean_difference(values: np.ndarray, labels: np.ndarray, n_object: int) -> np.ndarray:
    """mean(values[labels]) - mean(values[~labels]) per column of [tokens layers]."""
    total, object_sum = values.sum(0), values[labels].sum(0)
    return object_sum / n_object - (total - object_sum) / (len(labels) - n_object)


# ---------------------------------------------------------------------------------------------------------
# Plots


def plot(table: pd.DataFrame, *, baseline: pd.DataFrame | None = None, y: str | None = None, title: str = ""):
    """A plotly Figure of any measure's table (recognised by its columns).

    identifiability: `y` (default mean_identifiability) per layer and token set, `baseline` (the random
    twin's table) dashed, chance (0.5) dotted; compare_to_random: mean vs random mean; change_rate,
    class_similarity_change: rates per layer; residual_composition: the four shares as bars;
    context_difference: the difference per layer, p-values on hover.
    """
    import plotly.express as px
    import plotly.graph_objects as go

    columns = set(table.columns)
    if {"mean_identifiability", "tokens"} <= columns:
        y = y or "mean_identifiability"
        figure = px.line(table, x="layer", y=y, color="tokens", markers=True)
        if baseline is not None:
            for kind, part in baseline.groupby("tokens", sort=False):
                figure.add_scatter(x=part["layer"], y=part[y], mode="lines", name=f"{kind} (random)",
                                   line={"dash": "dash"})
        if y == "mean_identifiability":
            figure.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    elif {"random_mean", "p_value"} <= columns:
        long = table.melt(id_vars=["layer", "tokens", "p_value"], value_vars=["mean", "random_mean"],
                          var_name="model", value_name="mean identifiability")
        figure = px.line(long, x="layer", y="mean identifiability", color="tokens", line_dash="model",
                         markers=True, hover_data=["p_value"])
    elif {"attn", "mlp", "prev", "comp"} <= columns:
        long = table.melt(id_vars="layer", var_name="source", value_name="% of tokens")
        figure = px.bar(long, x="layer", y="% of tokens", color="source", barmode="group")
    elif {"difference", "p_value"} <= columns:
        figure = px.bar(table, x="layer", y="difference", hover_data=["p_value"])
    elif {"sublayer", "rate"} <= columns:
        figure = px.line(table, x="layer", y="rate", color="sublayer", line_dash="tokens", markers=True)
    elif {"layer", "rate"} <= columns:
        figure = go.Figure(go.Scatter(x=table["layer"], y=table["rate"], mode="lines+markers"))
        figure.update_layout(xaxis_title="layer", yaxis_title="% of image tokens whose label logit rises")
    else:
        raise ValueError(f"no plot for a table with columns {sorted(columns)}; pass the DataFrame of one of "
                         "this module's measures")
    figure.update_layout(title=title or None, template="plotly_white")
    return figure


# ---------------------------------------------------------------------------------------------------------
# Command line (declared in analyses/commands.py)


def load_inputs(args):
    """(model, dataset) of a ``vitlens analyze`` command: ``--model``, ``--data``, ``--mask-resize`` (default
    "area" for the scenes, whose digit strokes nearest masks call context, and "nearest", the study's, else)."""
    from vitlens import load_model
    from vitlens.data import load_dataset

    model = load_model(args.model)
    mask_resize = args.mask_resize or ("area" if args.data == "scenes" else "nearest")
    return model, load_dataset(args.data, model=model, mask_resize=mask_resize, n_per_class=args.n_per_class)


def write_tables(store_path, tables: dict[str, pd.DataFrame]) -> None:
    """Print each table and write it as ``<store>/results/<name>.csv``."""
    results = Path(store_path) / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(results / f"{name}.csv", index=False)
        print(f"\n{name} ({results / f'{name}.csv'})")
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def cli(args) -> None:
    """``vitlens analyze identifiability``: record the projections (resumable), then every measure."""
    model, data = load_inputs(args)
    store = run(model, data, args.store, compat=args.compat, random_twin=args.random_twin,
                batch_size=args.batch_size, device=args.device, precision=args.precision,
                progress=not args.no_progress)
    with store:
        tables = {"identifiability": identifiability(store, compat=args.compat)}
        if args.random_twin:
            tables["compare_to_random"] = compare_to_random(store, random_twin_path(args.store), compat=args.compat)
        tables["change_rate"] = change_rate(store, compat=args.compat)
        tables["class_similarity_change"] = class_similarity_change(store, compat=args.compat)
        tables["residual_composition"] = residual_composition(store, compat=args.compat)
        if "token_mask" in data[0]:
            for measure in CONTEXT_MEASURES:
                tables[f"context_difference_{measure}"] = context_difference(store, data, measure=measure,
                                                                             compat=args.compat)
        write_tables(args.store, tables)
