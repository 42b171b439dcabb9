"""The batch recorder: dataset -> HookedViT -> ActivationStore, resumable, deterministic, multi-writer.

:func:`record` runs the model over a dataset in eval and inference mode and keeps, per hook, all tokens or a
token selection, plus the results of :class:`Reducer` s that summarise activations on the device (e.g.
the class ranks of :mod:`analyses.class_embedding`). The forward, the device-to-host copy (pinned memory, a side stream) and the
HDF5 write (a writer thread behind a bounded queue) overlap.

Batches never straddle shards, so each shard is computed from the same batches whether a run was
interrupted or not, and by whichever rank owns it: resumed, multi-rank and single runs give bitwise the
same store.
"""
from __future__ import annotations

import errno
import fnmatch
import inspect
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from vitlens.hooked import UnknownHookError
from vitlens.store import METADATA_FILE, SHARD_DIR, ActivationStore, ShardWriter

STORE_DTYPES = ("float16", "float32", "float64")
_SHARD_BYTES = 256 << 20
_MAX_SHARD_SIZE = 4096
_NO_TOKEN_AXIS = ("hook_embed", "hook_pooled", "hook_logits")  # patches only, or pooled: no layout axis


class Reducer:
    """Summarises activations on the device during the forward; the store keeps only the summary.

    A reducer reads the hooks listed by :meth:`hooks` and turns each activation ``[batch, ...]`` into
    ``[batch, *per_hook]`` in :meth:`reduce` (inside the hook, so the activation is freed right away). The
    stored output, named :attr:`name`, stacks the hooks: ``[n_samples, n_hooks, *per_hook]`` of :attr:`dtype`,
    which :meth:`shape` declares (without the sample axis).
    """

    name: str
    dtype: str

    def hooks(self, model) -> list[str]:
        raise NotImplementedError

    def shape(self, model) -> tuple[int, ...]:
        raise NotImplementedError

    def reduce(self, model, activation: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """What the store's metadata records about the reducer (its class and settings)."""
        return {"class": type(self).__name__, **vars(self)}


class Computation:
    """A per-image result computed from each batch, outside the hooked forward: explanation maps (which
    need autograd), faithfulness scores, anything that is not a reduction of one hook.

    :meth:`compute` gets the model, the batch's images ``[batch C H W]`` and labels ``[batch]`` on the device
    (and, if it accepts a ``batch`` keyword, the batch's other item fields collated, e.g. ``token_mask``
    ``[batch grid_h grid_w]``) and returns ``[batch, *shape]``, which the store keeps under :attr:`name` as
    :attr:`dtype`. It runs under the recording's autocast, in inference mode unless :attr:`needs_grad`.
    """

    name: str
    dtype: str
    needs_grad: bool = False

    def shape(self, model) -> tuple[int, ...]:
        raise NotImplementedError

    def compute(self, model, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """What the store's metadata records about the computation (its class and settings)."""
        return {"class": type(self).__name__, **vars(self)}

    @property
    def wants_batch(self) -> bool:
        """Whether :meth:`compute` takes the collated extra item fields (a ``batch`` or ``**`` keyword)."""
        parameters = inspect.signature(self.compute).parameters.values()
        return any(p.name == "batch" or p.kind is p.VAR_KEYWORD for p in parameters)


def token_axis(hook: str) -> int | None:
    """Per-sample axis of a hook's activation that runs over the token layout (None if it has none).

    Attention scores and patterns [head query key] select queries (as TransformerLens' ``pos_slice``).
    """
    if hook.endswith(("hook_attn_scores", "hook_pattern")):
        return 1
    return None if hook in _NO_TOKEN_AXIS else 0


def resolve_hooks(model, hooks, tokens: str | Sequence[int] = "all") -> dict[str, list[int] | None]:
    """Hook names (glob patterns allowed) -> token indices to keep (None = all), checked against the model.

    `hooks` is a name, a list of names (all recorded with `tokens`) or a mapping name -> selection. A
    selection is "all", a token kind ("cls", "registers", "prefix", "patches", ...) or a list of indices.
    """
    if isinstance(hooks, str):
        hooks = [hooks]
    requested = hooks.items() if isinstance(hooks, Mapping) else [(name, tokens) for name in hooks]
    resolved = {}
    for pattern, selection in requested:
        for name in _expand(model, pattern):
            resolved[name] = _resolve_tokens(model, name, selection)
    return resolved


def _expand(model, pattern: str) -> list[str]:
    if not any(c in pattern for c in "*?["):
        model.hook_dict[pattern]  # raises UnknownHookError naming the closest hooks
        return [pattern]
    names = fnmatch.filter(model.hook_dict, pattern)
    if not names:
        raise UnknownHookError(f"no hook matches {pattern!r}; model.hook_dict lists all hook names")
    return names


def _resolve_tokens(model, hook: str, selection) -> list[int] | None:
    if isinstance(selection, str) and selection == "all":
        return None
    if token_axis(hook) is None:
        raise ValueError(f"{hook} has no token axis of the model's layout; record it with tokens='all'")
    indices = model.tokens(selection) if isinstance(selection, str) else torch.as_tensor(selection)
    indices = sorted({int(i) for i in indices.flatten()})
    n = model.layout.n_tokens
    if not indices or not 0 <= indices[0] <= indices[-1] < n:
        raise ValueError(f"token selection {selection!r} of {hook} must be non-empty indices in [0, {n})")
    return indices


class _Capture:
    """Forward hooks that keep the selected tokens of each hook and the reducer results of one batch."""

    def __init__(self, model, hooks: dict[str, list[int] | None], reducers: Sequence[Reducer], dtype: str,
                 autocast: torch.dtype | None, device: torch.device, computations: Sequence[Computation] = ()):
        self.model, self.dtype, self.autocast = model, getattr(torch, dtype), autocast
        self.hooks, self.reducers, self.computations = hooks, list(reducers), list(computations)
        # on the device once: a copy from pageable memory in every hook call would synchronise the GPU
        self._token_index = {name: torch.tensor(t, device=device) for name, t in hooks.items() if t is not None}

    def run(self, images: torch.Tensor, labels: torch.Tensor, extras: dict | None = None) -> dict[str, torch.Tensor]:
        """Forward one batch (eval and inference mode), then run the computations (with `extras`, the
        collated other item fields); returns ``{output name: tensor [batch, *shape]}``."""
        outputs = self._forward(images, labels) if self.hooks or self.reducers else {}
        amp = torch.autocast(images.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        for computation in self.computations:
            kwargs = {"batch": extras or {}} if computation.wants_batch else {}
            grad = torch.inference_mode(False) if computation.needs_grad else torch.inference_mode()
            with grad, torch.set_grad_enabled(computation.needs_grad), amp:
                result = computation.compute(self.model, images, labels, **kwargs)
            if not isinstance(result, torch.Tensor) or result.shape[:1] != images.shape[:1]:
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise ValueError(f"computation {computation.name} returned {got}; it must return a tensor "
                                 f"[batch={len(images)}, *shape]")
            outputs[computation.name] = result.detach().to(getattr(torch, computation.dtype))
        return outputs

    def _forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs, parts = {}, {r.name: [] for r in self.reducers}
        n_tokens = self.model.layout_for(images).n_tokens

        def keep(activation, hook):
            axis = token_axis(hook.name)
            if axis is not None and activation.shape[axis + 1] != n_tokens:
                raise ValueError(f"{hook.name} has shape {tuple(activation.shape)}: axis {axis + 1} is not the "
                                 f"token axis ({n_tokens} tokens)")
            index = self._token_index.get(hook.name)
            if index is not None:
                activation = activation.index_select(axis + 1, index)
            outputs[hook.name] = activation.to(self.dtype)

        def reducing(reducer):
            def hook_fn(activation, hook):
                parts[reducer.name].append(reducer.reduce(self.model, activation, labels))
            return hook_fn

        fwd_hooks = [(name, keep) for name in self.hooks]
        fwd_hooks += [(name, reducing(r)) for r in self.reducers for name in r.hooks(self.model)]
        amp = torch.autocast(images.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        with torch.inference_mode(), amp:
            self.model.run_with_hooks(images, fwd_hooks=fwd_hooks)
        for reducer in self.reducers:
            outputs[reducer.name] = torch.stack(parts[reducer.name], dim=1).to(getattr(torch, reducer.dtype))
        return outputs


class _Writer(threading.Thread):
    """Writes batches into shards in the background; a complete shard is committed (fsync, rename) on a
    second thread while the next one is written, so the disk never waits for the fsync.

    Items are ``(shard, offset, {name: host tensor}, ready event or None)``. On an error the thread stops,
    removes the unfinished shard's temporary file and keeps the error (and its shard) for the main thread.
    """

    def __init__(self, store: ActivationStore, progress: tqdm, depth: int = 4):
        super().__init__(name="vitlens-writer", daemon=True)
        self.store, self.progress = store, progress
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.shard: int | None = None

    def put(self, item) -> None:
        while self.is_alive():
            try:
                return self.queue.put(item, timeout=0.2)
            except queue.Full:
                continue

    def run(self) -> None:
        writer, committing = None, None
        with ThreadPoolExecutor(1, thread_name_prefix="vitlens-commit") as committer:
            try:
                while (item := self.queue.get()) is not None:
                    shard, offset, arrays, ready = item
                    if ready is not None:
                        ready.synchronize()
                    if writer is None:
                        self.shard, writer = shard, ShardWriter(self.store, shard)
                    writer.write(offset, {name: t.numpy() for name, t in arrays.items()})
                    self.progress.update(len(next(iter(arrays.values()))))
                    if writer.complete:
                        self._wait(committing)  # at most one commit in flight
                        committing, writer = (shard, committer.submit(writer.commit)), None
                self._wait(committing)
            except BaseException as error:  # handed to the main thread
                self.error = error
            finally:
                if writer is not None:
                    writer.abort()

    def _wait(self, committing: tuple[int, Future] | None) -> None:
        if committing is not None and committing[1].exception() is not None:
            self.shard = committing[0]
            raise committing[1].exception()


def record(model, dataset, path: str | os.PathLike, hooks=(), tokens: str | Sequence[int] = "all", *,
           reducers: Sequence[Reducer] = (), computations: Sequence[Computation] = (),
           dtype: str = "float16", batch_size: int = 32,
           device: str | torch.device | None = None, shard_size: int | None = None, num_workers: int = 0,
           autocast: torch.dtype | None = None, rank: int | None = None,
           world_size: int | None = None, progress: bool = True) -> ActivationStore:
    """Record activations of `model` over `dataset` into the store at `path`; resume it if it exists.

    Args:
        model: a :class:`~vitlens.HookedViT` (moved to `device`; run in eval and inference mode).
        dataset: items ``{"image": [C H W], "label": int, "sample_id": str, ...}`` and a ``.samples``
            DataFrame (``sample_id``, ``label``) in item order.
        path: the store directory (created if needed).
        hooks: hook names or glob patterns (``"blocks.*.hook_resid_post"``), or a mapping name -> tokens.
        tokens: token selection for hooks given as names: "all", a kind ("cls", "patches", ...) or indices.
        reducers: :class:`Reducer` s computed on the device (e.g. ``analyses.class_embedding.ClassRankReducer()``).
        computations: :class:`Computation` s run on every batch after the hooked forward (which is skipped
            when there are no hooks and no reducers), e.g. explanation maps or faithfulness scores.
        dtype: storage dtype of hook activations (float16, float32 or float64).
        batch_size: images per forward; also fixes how each shard is batched (keep it when resuming).
        device: default ``cuda:$LOCAL_RANK`` when CUDA is available, else cpu.
        shard_size: samples per shard (default: about 256 MB per shard, a multiple of `batch_size`).
        num_workers: DataLoader worker processes.
        autocast: e.g. ``torch.bfloat16`` to run the forward under autocast.
        rank, world_size: this writer and the number of writers (default from torchrun's RANK and
            WORLD_SIZE). Shard s belongs to rank s % world_size; rank 0 creates the store.
        progress: show a tqdm bar (images/s, ETA).

    Returns the store, opened (its index covers the shards on disk when this rank finished).

    Raises:
        UnknownHookError, ValueError: bad hooks, tokens or dtype (before anything is computed or written).
        StoreMismatchError: `path` holds a store of another model, preprocessing, sample list or outputs.
        PermissionError: `path` cannot be written (checked before any compute).
        OSError (ENOSPC): the disk filled up; complete shards stay intact and the run can be resumed.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}): pass 0 <= rank < world_size "
                         "(torchrun sets RANK and WORLD_SIZE)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of samples, or None for about 256 MB per "
                         f"shard; got {shard_size}")
    if device is None:
        cuda = torch.cuda.is_available()
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    device = torch.device(device)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a store dtype; use one of {STORE_DTYPES}")
    path = Path(path)
    selections = resolve_hooks(model, hooks, tokens)
    reducers, computations = list(reducers), list(computations)
    names = list(selections) + [r.name for r in reducers] + [c.name for c in computations]
    if not names:
        raise ValueError("nothing to record: pass hooks=..., reducers=... and/or computations=...")
    if len(set(names)) != len(names):
        raise ValueError(f"output names must be unique, got {names}")
    for reducer in reducers:
        for name in reducer.hooks(model):
            _expand(model, name)
    for computation in computations:
        _check_dtype(computation)
    _check_writable(path)

    model.to(device).eval()
    capture = _Capture(model, selections, reducers, dtype, autocast, device, computations)
    request = _request(model, dataset, selections, reducers, computations, dtype, autocast, shard_size)
    store = _open_or_create(path, request, capture, dataset, device, batch_size, rank)

    mine = [s for s in range(store.n_shards) if s % world_size == rank]
    on_disk = store.shards_on_disk()
    todo = [s for s in mine if s not in on_disk]
    batches = [list(range(b, min(b + batch_size, stop)))
               for start, stop in map(store.shard_range, todo) for b in range(start, stop, batch_size)]
    total = sum(stop - start for start, stop in map(store.shard_range, mine))
    remaining = sum(len(b) for b in batches)
    bar = tqdm(total=total, initial=total - remaining, unit="img", dynamic_ncols=True,
               desc="recording" if world_size == 1 else f"recording (rank {rank})", disable=not progress,
               position=rank)
    if progress and remaining < total:
        bar.write(f"resuming {path}: {total - remaining} of {total} samples already recorded")

    collate = partial(_collate, extras=any(c.wants_batch for c in computations))
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    try:
        with bar:
            _write_shards(store, capture, zip(batches, loader), device, bar)
    except BaseException:
        store.close()
        raise
    return store.refresh()


def _write_shards(store: ActivationStore, capture: _Capture, batches, device: torch.device, bar: tqdm) -> None:
    """Forward each batch, copy its outputs to the host and hand them to the writer thread."""
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    writer = _Writer(store, bar)
    writer.start()
    try:
        for rows, (images, labels, sample_ids, extras) in batches:
            if writer.error is not None:
                break
            _check_items(rows, sample_ids, labels, store.meta["samples"])
            extras = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
            outputs = capture.run(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), extras)
            host, ready = _to_host(outputs, copy_stream)
            shard = rows[0] // store.shard_size
            writer.put((shard, rows[0] - shard * store.shard_size, host, ready))
    finally:
        writer.put(None)
        writer.join()
    if writer.error is not None:
        raise _writer_failure(writer, store) from writer.error


def _check_dtype(computation: Computation) -> None:
    try:
        same = str(getattr(torch, computation.dtype)) == f"torch.{computation.dtype}" == f"torch.{np.dtype(computation.dtype)}"
    except (AttributeError, TypeError):
        same = False
    if not same:
        raise ValueError(f"computation {computation.name} has dtype {computation.dtype!r}; use a dtype name that "
                         "numpy and torch share, e.g. 'float32', 'float16', 'int16' or 'bool'")


def _request(model, dataset, selections, reducers, computations, dtype, autocast, shard_size) -> dict:
    """What identifies a store: model, preprocessing, layout, samples, outputs (shapes come later)."""
    samples = getattr(dataset, "samples", None)
    if samples is None or not {"sample_id", "label"} <= set(samples.columns):
        raise ValueError("the dataset needs a .samples DataFrame with sample_id and label columns, in item order")
    if len(samples) != len(dataset):
        raise ValueError(f"dataset.samples has {len(samples)} rows but the dataset has {len(dataset)} items")
    outputs = {name: {"hook": name, "tokens": t, "token_axis": token_axis(name), "dtype": dtype, "reducer": None}
               for name, t in selections.items()}
    outputs.update({r.name: {"hook": None, "tokens": None, "token_axis": None, "dtype": r.dtype,
                             "reducer": r.to_dict()} for r in reducers})
    outputs.update({c.name: {"hook": None, "tokens": None, "token_axis": None, "dtype": c.dtype, "reducer": None,
                             "computation": c.to_dict()} for c in computations})
    return {
        "model": {"tag": model.tag, "weights_hash": model.weights_hash(),
                  "cfg": {k: getattr(model.cfg, k) for k in
                          ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx")}},
        "preprocessing": getattr(dataset, "data_config", None) or model.data_config,
        "samples": {"sample_id": [str(s) for s in samples["sample_id"]],
                    "label": [int(x) for x in samples["label"]]},
        "n_samples": len(samples),
        "outputs": outputs,
        "dtype": dtype,
        "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
        **({} if shard_size is None else {"shard_size": shard_size}),  # absent: the store's, or a default
    }


def _open_or_create(path, request, capture, dataset, device, batch_size, rank):
    """Open and check the store at `path`, or create it (rank 0; other ranks wait for its metadata)."""
    wants_batch = any(c.wants_batch for c in capture.computations)
    images, labels, sample_ids, extras = _collate([dataset[0]], wants_batch)  # the first item, as a batch of one
    _check_items([0], sample_ids, labels, request["samples"])
    layout = capture.model.layout_for(images).to_dict()
    if not (path / METADATA_FILE).exists():
        if rank == 0:
            extras = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
            meta = _complete(request, capture, images.to(device), labels.to(device), extras, layout, batch_size)
            return ActivationStore.create(path, meta)
        _wait_for(path / METADATA_FILE)
    store = ActivationStore(path)
    store.check_compatible(request, source="request")
    store.check_compatible({"layout": layout}, source="model")
    if store.meta["batch_size"] != batch_size:
        tqdm.write(f"note: {path} was recorded with batch_size {store.meta['batch_size']}; batches of "
                   f"{batch_size} may differ in the last bits from an uninterrupted run")
    return store


def _complete(request, capture, images, labels, extras, layout, batch_size) -> dict:
    """Add the token layout and what a forward on the first sample tells: each output's shape."""
    probe = capture.run(images, labels, extras)
    outputs = {name: {**spec, "shape": list(probe[name].shape[1:])} for name, spec in request["outputs"].items()}
    for kind, output in [("reducer", r) for r in capture.reducers] + [("computation", c) for c in capture.computations]:
        declared = tuple(output.shape(capture.model))
        if tuple(outputs[output.name]["shape"]) != declared:
            raise ValueError(f"{kind} {output.name} declares shape {declared} but produced "
                             f"{outputs[output.name]['shape']}")
    shard_size = request.get("shard_size")
    if shard_size is None:
        sample_bytes = sum(t[0].numel() * t.element_size() for t in probe.values())
        rows = max(1, min(_MAX_SHARD_SIZE, _SHARD_BYTES // sample_bytes))
        shard_size = rows // batch_size * batch_size or rows
    return {**request, "outputs": outputs, "layout": layout, "shard_size": shard_size,
            "batch_size": batch_size}


_ITEM_KEYS = ("image", "label", "sample_id")


def _collate(items: list[dict], extras: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(images [b C H W], labels [b], sample ids, the other item fields collated if `extras`, else {})."""
    other = {}
    if extras:
        for key in items[0].keys() - set(_ITEM_KEYS):
            try:
                other[key] = default_collate([item[key] for item in items])
            except (TypeError, RuntimeError, KeyError) as error:
                raise ValueError(f"item field {key!r} cannot be batched for the computations ({error}); give "
                                 "every item the same tensor shape or number for it") from None
    return (torch.stack([item["image"] for item in items]), torch.tensor([item["label"] for item in items]),
            [str(item["sample_id"]) for item in items], other)


def _check_items(rows: list[int], sample_ids: list[str], labels: torch.Tensor, samples: Mapping[str, list]) -> None:
    """Raise unless the items of a batch (contiguous `rows`) have the sample ids and labels of .samples."""
    for column, values in (("sample_id", sample_ids), ("label", labels.tolist())):
        expected = samples[column][rows[0]:rows[-1] + 1]
        if values != expected:
            i = next(i for i, (a, b) in enumerate(zip(values, expected)) if a != b)
            raise ValueError(f"dataset item {rows[i]} has {column} {values[i]!r} but dataset.samples lists "
                             f"{expected[i]!r}: the items and .samples must agree, in the same order")


def _to_host(outputs: dict[str, torch.Tensor], copy_stream):
    """Start the device-to-host copies into pinned memory on a side stream; returns (host tensors, event)."""
    if copy_stream is None:
        return outputs, None
    copy_stream.wait_stream(torch.cuda.current_stream(copy_stream.device))
    host = {}
    with torch.cuda.stream(copy_stream):
        for name, tensor in outputs.items():
            host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host[name].copy_(tensor, non_blocking=True)
            tensor.record_stream(copy_stream)
    return host, copy_stream.record_event()


def _check_writable(path: Path) -> None:
    """Fail before any compute if the store directory (or the folder that would hold it) is read-only.

    Creates and removes a probe file, which also catches read-only mounts and immutable directories
    that permission bits (and ``os.access`` as root) do not show.
    """
    targets = [p for p in (path, path / SHARD_DIR) if p.is_dir()]
    if not targets:
        targets = [next(p for p in path.parents if p.is_dir())]
    for folder in targets:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise PermissionError(errno.EACCES, f"cannot write to {folder} ({error.strerror}); nothing was "
                                  "computed. Record into a writable path") from error


def _wait_for(file: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not create {file} within {timeout:.0f} s")
        time.sleep(0.2)


def _writer_failure(writer: _Writer, store: ActivationStore) -> BaseException:
    """The error to raise for a failed shard write, saying what is intact and how to resume."""
    error = writer.error
    if not isinstance(error, OSError):
        return error
    full = error.errno == errno.ENOSPC or "No space left" in str(error)
    what, then = ("disk full", "Free space and run") if full else (f"error ({error})", "Run")
    return OSError(errno.ENOSPC if full else error.errno,
                   f"{what} while writing shard {writer.shard} of {store.path}; {len(store.shards_on_disk())} "
                   f"complete shard(s) are intact and the partial shard was removed. {then} the same record "
                   "call again to resume")
