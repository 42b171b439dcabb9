"""Class-embedding projection: every token at every layer read as class evidence (vit-cls_emb, §A4-A5).

A token's residual (or a sub-layer's output, alone) projected through the final norm and the classifier head
gives its class logits; the label's rank there says how far the token has built the class. The projections
are computed on the device during the recording, as :class:`~vitlens.recorder.Reducer` s, so dataset-scale
studies keep a few bytes per token and layer instead of an activation (:func:`run`). The study's measures
(identifiability, change rates, residual composition, class vs context tokens) then read such a store and
return tidy DataFrames; they and :func:`plot` live in :mod:`analyses.identifiability` and are re-exported here.

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

import pandas as pd
import torch

# the measures over a store live in analyses.identifiability; re-exported here (public names of this module)
from analyses.identifiability import (CONTEXT_MEASURES, RECORD_HINT, change_rate, class_similarity_change,
                                      compare_to_random, context_difference, identifiability, object_masks, plot,
                                      residual_composition, token_sets)
from vitlens.recorder import Reducer

SOURCES = {"": "hook_resid_post", "_attn": "hook_attn_out", "_mlp": "hook_mlp_out"}
"""Store output suffix -> the hook projected: the residual after each block, and what each sub-layer adds
(``hook_attn_out``/``hook_mlp_out``: after LayerScale, or after the block's own norm for post-norm blocks,
as §A4 does for the GAP model)."""
PRECISIONS = ("auto", "float32", "bfloat16")


# ---------------------------------------------------------------------------------------------------------
# Projection of tensors


def label_rank(logits: torch.Tensor, labels: torch.Tensor, *, compat: bool = False) -> torch.Tensor:
    """Rank of the label among the classes, int64 [batch pos] from logits [batch pos classes] (0 = top-1).

    Default: the number of classes with a strictly larger logit, so a tie places the label first.
    ``compat=True``: the position of the label in a stable descending argsort, as vit-cls_emb's
    ``argsort`` gives it (tied classes with a smaller index come first, §A12.12).
    """
    label_logit = logits.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1))
    rank = _count(logits > label_logit)
    if compat:
        before = torch.arange(logits.shape[-1], device=logits.device) < labels.view(-1, 1, 1)
        rank = rank + _count((logits == label_logit) & before)
    return rank


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Number of True along the last axis, int64 (a uint8 sum: several times faster than count_nonzero on
    a CPU; exact up to 2**31 classes)."""
    return mask.view(torch.uint8).sum(-1, dtype=torch.int32).long()


class Projection(NamedTuple):
    """The class-embedding projection of every token, reduced: rank, logit and top-5 of the label."""

    rank: torch.Tensor  # int16 [batch pos]
    logit: torch.Tensor  # float32 [batch pos], the label's logit
    top5: torch.Tensor  # int16 [batch pos 5], the five best classes, best first


def resolve_precision(precision: str, device: torch.device | str, compat: bool = False) -> str:
    """``"auto"`` -> ``"bfloat16"`` on CUDA or on a CPU with native bfloat16 (AMX or AVX512-BF16), else
    ``"float32"``; other values are checked and returned. Without native support the bfloat16 projection is
    slower than float32 (measured 0.21 of the forward vs 0.82). With `compat` (the study's numbers, which it
    computed in float32 and whose ties its sort places) "auto" is always ``"float32"`` and ``"bfloat16"`` is
    refused."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if compat:
        if precision == "bfloat16":
            raise ValueError("compat=True reproduces vit-cls_emb's float32 ranks (ties placed by its sort), which "
                             "bfloat16 cannot: pass precision='auto' or 'float32' with compat=True")
        return "float32"
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
    forward. `compat` places ties as vit-cls_emb's sort does (:func:`label_rank`), in float32 (the study's
    precision: "auto" resolves to it, "bfloat16" is refused).

    ``precision="bfloat16"`` rounds the normed tokens and the head to bfloat16 and sums the products in
    float32, with the label's logit subtracted inside the product (see :func:`_bfloat16_differences`): the
    rank changes only for classes within about 1% of the label's logit, the top-5 order only among classes
    that close to each other, and the label's logit is that of the rounded operands.
    """
    precision = resolve_precision(precision, activation.device, compat)
    with torch.autocast(activation.device.type, enabled=False):
        normed = model.final_norm(activation.float())
        if precision == "float32":
            logits = model.vit.head(normed)
            label_logit = logits.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(-1)
            rank = label_rank(logits, labels, compat=compat)
        else:
            logits, label_logit = _bfloat16_differences(normed, _bfloat16_head(model), labels)
            label_index = labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
            # a positive bfloat16 is a positive int16; the label's own difference (~0) does not count
            above = logits.view(torch.int16) > 0
            rank = _count(above) - above.gather(-1, label_index).squeeze(-1).long()
        top5 = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    return Projection(rank.to(torch.int16), label_logit.float(), top5.to(torch.int16))


def _bfloat16_head(model) -> torch.Tensor:
    """bfloat16 [d_model+4 classes]: the head's W_U, b_U and three rows of ones (the right operand of
    :func:`_bfloat16_differences`), built once per head weights and device (rebuilt when they change)."""
    W_U, b_U = model.W_U, model.b_U
    key = (W_U.data_ptr(), b_U.data_ptr(), W_U.device, None if W_U.is_inference() else W_U._version,
           None if b_U.is_inference() else b_U._version)
    cached = getattr(model, "_class_embedding_head", None)
    if cached is None or cached[0] != key:
        W = W_U.detach().bfloat16()
        cached = key, torch.cat([W, b_U.detach().bfloat16()[None], W.new_ones(3, W.shape[1])])
        model._class_embedding_head = cached
    return cached[1]


def _bfloat16_differences(normed: torch.Tensor, head: torch.Tensor,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bfloat16 [batch pos classes] ``z.W_c + b_c - L``, float32 [batch pos] L) for z, W, b rounded to bfloat16
    (`head`: :func:`_bfloat16_head`).

    One bfloat16 matmul computes the difference to L, the label's logit, for every class; L is computed from
    the same rounded operands (exact products, a float32 sum) and fed in as three bfloat16 parts against
    rows of ones. The matmul sums in float32; rounding its output to bfloat16 keeps the sign. The left
    operand [batch pos d_model+4] is written in place (no concatenation copies).
    """
    d_model = normed.shape[-1]
    lhs = normed.new_empty(*normed.shape[:-1], d_model + 4, dtype=torch.bfloat16)
    z = lhs[..., :d_model]
    z.copy_(normed)  # rounded to bfloat16 on the way in
    lhs[..., d_model] = 1
    label_columns = head[:d_model].T[labels].float().unsqueeze(-1)  # [batch d_model 1]
    label_logit = torch.bmm(z.float(), label_columns).squeeze(-1) + head[d_model, labels].float()[:, None]
    rest = -label_logit  # three bfloat16 parts hold a float32 exactly
    for part in range(3):
        lhs[..., d_model + 1 + part] = rest
        rest = rest - lhs[..., d_model + 1 + part].float()
    with _float32_bfloat16_sums(normed.device):
        return lhs @ head, label_logit


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

    - ``"float32"``: float32 logits, the ranks of vit-cls_emb.
    - ``"bfloat16"``: the normed tokens and the head rounded to bfloat16, products summed in float32
      (half the cost on a CPU with AMX; GPUs run it on their bfloat16 units). The label's logit is
      subtracted inside the product, so the sign of each difference is not rounded away and no bfloat16
      ties appear; a class can move across the label only when their float32 logits differ by less than
      ``2**-7 * (m_c + m_label)``, with ``m_c = sum_i |z_i W_ic| + |b_c|`` (about 1% of the logit scale).
    - ``"auto"`` (default): bfloat16 where the hardware runs it natively (CUDA, AMX or AVX512-BF16), else
      float32 (:func:`resolve_precision`).
    """

    dtype = "int16"
    PRECISIONS = PRECISIONS

    def __init__(self, hook: str = "hook_resid_post", name: str = "class_rank", precision: str = "auto"):
        resolve_precision(precision, "cpu")  # checks it
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
        resolve_precision(precision, "cpu", compat)  # bfloat16 with compat is refused here, before a forward
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
    hardware runs it natively). ``compat=True`` ranks ties as vit-cls_emb's sort (:func:`label_rank`), in
    float32 as the study did ("auto" resolves to float32 there; "bfloat16" is refused).
    ``random_twin=True`` also records :func:`random_model` (seeded with `seed`) over the same data into
    ``<store>-random`` (:func:`random_twin_path`), the baseline of :func:`compare_to_random`. Running again
    finishes only the missing images. Other keyword arguments go to :func:`vitlens.record`.

    Returns the store (an :class:`~vitlens.ActivationStore`).
    """
    from vitlens.recorder import record

    options = dict(hooks={"hook_logits": "all"}, dtype="float32", batch_size=batch_size, device=device,
                   progress=progress, **record_options)
    if random_twin:
        record(random_model(model, seed), data, random_twin_path(store),
               reducers=projection_reducers(precision=precision, compat=compat), **options).close()
    return record(model, data, store, reducers=projection_reducers(precision=precision, compat=compat), **options)


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
