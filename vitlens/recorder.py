"""The batch recorder: dataset -> HookedViT -> ActivationStore, resumable, deterministic, multi-writer.

:func:`record` runs the model over a dataset in eval and inference mode and keeps, per hook, all tokens or a
token selection, plus the results of :class:`Reducer` s that summarise activations on the device (e.g.
the class ranks of :mod:`analyses.class_embedding`). The forward, the device-to-host copy (pinned memory, a side stream) and the
HDF5 write (a writer thread behind a bounded queue) overlap. What is captured per batch (hooks, reducers,
computations) is defined in :mod:`vitlens.capture`; its public names are importable from here as well.

Batches never straddle shards, so each shard is computed from the same batches whether a run was
interrupted or not, and by whichever rank owns it: resumed, multi-rank and single runs give bitwise the
same store.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from vitlens.capture import Computation, Reducer, _Capture, expand_hook, resolve_hooks, token_axis
from vitlens.shards import Claims, ShardWriter, create_store, new_writer_id, remove_dead_temporaries, write_index
from vitlens.store import CODECS, METADATA_FILE, SHARD_DIR, ActivationStore, check_count

STORE_DTYPES = ("float16", "float32", "float64")
_SHARD_BYTES = 256 << 20
_SHARD_SECONDS = 60.0  # the default shard size keeps about a minute of work at risk
_MAX_SHARD_SIZE = 4096


class RecordingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a recording; the complete shards are kept and the same call resumes."""

    def __init__(self, kept: int, total: int):
        super().__init__(f"interrupted: run the same command to resume ({kept} of {total} samples kept)")
        self.kept, self.total = kept, total

    def __str__(self) -> str:
        return self.args[0]


class _Writer(threading.Thread):
    """Writes batches into shards in the background; a complete shard is committed (fsync, check, link) on
    a second thread while the next one is written, so the disk never waits for the fsync.

    Items are ``(shard, offset, {name: host tensor}, ready event or None, skipped)``. On an error the thread
    stops, removes the unfinished shard's temporary file and keeps the error (and its shard) for the main
    thread. Claims are released once their shard is published (or abandoned).
    """

    def __init__(self, store: ActivationStore, claims: Claims, progress: tqdm, depth: int = 4):
        super().__init__(name="vitlens-writer", daemon=True)
        self.store, self.claims, self.progress = store, claims, progress
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
                    shard, offset, arrays, ready, skipped = item
                    if ready is not None:
                        ready.synchronize()
                    if writer is None:
                        self.shard = shard
                        writer = ShardWriter(self.store, shard, self.claims.writer)
                    writer.write(offset, {name: t.numpy() for name, t in arrays.items()}, skipped)
                    self.progress.update(len(next(iter(arrays.values()))))
                    if writer.complete:
                        self._wait(committing)  # at most one commit in flight
                        committing, writer = (shard, committer.submit(self._commit, writer)), None
                self._wait(committing)
            except BaseException as error:  # handed to the main thread
                self.error = error
            finally:
                if writer is not None:
                    writer.abort()

    def _commit(self, writer: ShardWriter) -> None:
        try:
            writer.commit()
        finally:
            self.claims.release(writer.shard)

    def _wait(self, committing: tuple[int, Future] | None) -> None:
        if committing is not None and committing[1].exception() is not None:
            self.shard = committing[0]
            raise committing[1].exception()


class _Plan:
    """The batch sampler of a writer: claims its next shard only when the loader needs it, re-reading which
    shards are published or claimed as it goes, and waits while other live writers hold the rest."""

    def __init__(self, store: ActivationStore, shards: list[int], claims: Claims, batch_size: int,
                 poll: float = 0.5):
        self.store, self.shards, self.claims, self.batch_size, self.poll = store, shards, claims, batch_size, poll

    def __iter__(self):
        while True:
            published = self.store._listing()
            todo = [s for s in self.shards if s not in published and s not in self.claims.held]
            if not todo:
                return
            claimed = False
            for shard in todo:
                if self.claims.claim(shard):
                    claimed = True
                    start, stop = self.store.shard_range(shard)
                    for b in range(start, stop, self.batch_size):
                        yield list(range(b, min(b + self.batch_size, stop)))
            if not claimed:
                time.sleep(self.poll)  # everything left is claimed by live writers: wait for them or their expiry


class _Items:
    """The dataset as the loader sees it: an item that cannot be loaded becomes ``{"error": ...}``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except Exception as error:  # noqa: BLE001 - reported by the main process, with the item's path
            return {"error": f"{type(error).__name__}: {error}", "index": index}


def record(model, dataset, path: str | os.PathLike, hooks=(), tokens: str | Sequence[int] = "all", *,
           reducers: Sequence[Reducer] = (), computations: Sequence[Computation] = (),
           dtype: str = "float16", batch_size: int = 32,
           device: str | torch.device | None = None, shard_size: int | None = None, num_workers: int = 0,
           autocast: torch.dtype | None = None, rank: int | None = None,
           world_size: int | None = None, progress: bool = True, compression=None,
           on_error: str = "raise") -> ActivationStore:
    """Record activations of `model` over `dataset` into the store at `path`; resume it if it exists.

    Any number of writers may run this on one store at once (see :mod:`vitlens.shards`): each claims the
    shards it computes, and each returns when every shard it may compute is published.

    Args:
        model: a :class:`~vitlens.HookedViT` (moved to `device`; run in eval and inference mode).
        dataset: items ``{"image": [C H W], "label": int, "sample_id": str, ...}`` and a ``.samples``
            DataFrame (``sample_id``, ``label``, optionally ``image_path``) in item order.
        path: the store directory (created if needed; ``~`` is expanded).
        hooks: hook names or glob patterns (``"blocks.*.hook_resid_post"``), or a mapping name -> tokens.
        tokens: token selection for hooks given as names: "all", a kind ("cls", "patches", ...) or indices.
        reducers: :class:`Reducer` s computed on the device (e.g. ``analyses.class_embedding.ClassRankReducer()``).
        computations: :class:`Computation` s run on every batch after the hooked forward (which is skipped
            when there are no hooks and no reducers), e.g. explanation maps or faithfulness scores.
        dtype: storage dtype of hook activations (float16, float32 or float64).
        batch_size: images per forward; also fixes how each shard is batched (keep it when resuming).
        device: default ``cuda:$LOCAL_RANK`` when CUDA is available, else cpu.
        shard_size: samples per shard. Default: about a minute of compute on this device (timed on the
            first sample), a multiple of `batch_size`, at most 4096 samples and about 256 MB.
        num_workers: DataLoader worker processes.
        autocast: e.g. ``torch.bfloat16`` to run the forward under autocast.
        rank, world_size: this writer's share (default from torchrun's RANK and WORLD_SIZE): shards
            s with s % world_size == rank. Plain processes with the same rank share those shards by claims.
        progress: show a tqdm bar (images/s, ETA).
        compression: None, a codec (``"gzip"``, ``"lzf"``) for every output, or a mapping output name or
            glob pattern -> codec. Compressed outputs are chunked (about 1 MiB per chunk).
        on_error: ``"raise"`` (an item that cannot be loaded stops the run, naming its path) or ``"skip"``
            (its rows are not recorded; ``store.skipped`` lists it with the error).

    Returns the store, opened after the shards of live writers are published.

    Raises:
        UnknownHookError, ValueError: bad hooks, tokens, dtype or items (before anything is written).
        FileNotFoundError: an image file listed in ``dataset.samples.image_path`` is missing or empty.
        StoreMismatchError: `path` holds a store of another model, preprocessing, sample list or outputs.
        PermissionError: `path` cannot be written (checked before any compute).
        OSError (ENOSPC): the disk filled up; complete shards stay intact and the run can be resumed.
        RecordingInterrupted: Ctrl-C; complete shards are kept, the message says how many samples.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}): pass 0 <= rank < world_size "
                         "(torchrun sets RANK and WORLD_SIZE)")
    check_count(batch_size, "batch_size must be a positive number of images")
    if shard_size is not None:
        check_count(shard_size, "shard_size must be a positive number of samples, or None for about a minute "
                                "of work per shard")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if device is None:
        cuda = torch.cuda.is_available()
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    device = torch.device(device)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a store dtype; use one of {STORE_DTYPES}")
    path = Path(path).expanduser()
    selections = resolve_hooks(model, hooks, tokens)
    reducers, computations = list(reducers), list(computations)
    names = list(selections) + [r.name for r in reducers] + [c.name for c in computations]
    if not names:
        raise ValueError("nothing to record: pass hooks=..., reducers=... and/or computations=...")
    if len(set(names)) != len(names):
        raise ValueError(f"output names must be unique, got {names}")
    for reducer in reducers:
        for name in reducer.hooks(model):
            expand_hook(model, name)
    for computation in computations:
        _check_dtype(computation)
    codecs = _codecs(compression, names)
    _check_writable(path)
    if on_error == "raise":
        _check_image_files(dataset)

    model.to(device).eval()
    capture = _Capture(model, selections, reducers, dtype, autocast, device, computations)
    request = _request(model, dataset, selections, reducers, computations, dtype, autocast, shard_size, codecs)
    store, image_shape = _open_or_create(path, request, capture, dataset, device, batch_size, rank, on_error)

    mine = [s for s in range(store.n_shards) if s % world_size == rank]
    claims = Claims(store, new_writer_id())
    try:
        remove_dead_temporaries(store, claims)
        published = store._listing()
        total = sum(stop - start for start, stop in map(store.shard_range, mine))
        remaining = sum(stop - start for s in mine if s not in published for start, stop in [store.shard_range(s)])
        bar = tqdm(total=total, initial=total - remaining, unit="img", dynamic_ncols=True,
                   desc="recording" if world_size == 1 else f"recording (rank {rank})", disable=not progress,
                   position=rank)
        if progress and remaining < total:
            bar.write(f"resuming {path}: {total - remaining} of {total} samples already recorded")
        collate = partial(_collate, extras=bool(capture.batched), image_shape=image_shape,
                          samples=request["samples"])
        loader = DataLoader(_Items(dataset), batch_sampler=_Plan(store, mine, claims, batch_size),
                            num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda")
        with bar:
            _write_shards(store, capture, loader, device, bar, claims, on_error, dataset)
        _wait_for_other_writers(store, claims)
    except KeyboardInterrupt:
        store.close()
        kept = int(ActivationStore(path).done.sum())
        raise RecordingInterrupted(kept, len(store)) from None
    except BaseException:
        store.close()
        raise
    finally:
        claims.close()
    store.refresh()
    write_index(store)
    return store


def _write_shards(store, capture: _Capture, loader, device: torch.device, bar: tqdm, claims: Claims,
                  on_error: str, dataset) -> None:
    """Forward each batch, copy its outputs to the host and hand them to the writer thread."""
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    writer = _Writer(store, claims, bar)
    writer.start()
    try:
        for images, labels, rows, sample_ids, extras, errors in loader:
            if writer.error is not None:
                break
            if errors and on_error == "raise":
                raise _item_error(dataset, *errors[0])
            _check_items(rows, sample_ids, labels, store.meta["samples"])
            extras = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
            outputs = capture.run(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), extras)
            host, ready = _to_host(outputs, copy_stream)
            shard = rows[0] // store.shard_size
            writer.put((shard, rows[0] - shard * store.shard_size, host, ready, errors))
    finally:
        writer.put(None)
        writer.join()
    if writer.error is not None:
        raise _writer_failure(writer, store) from writer.error


def _wait_for_other_writers(store: ActivationStore, claims: Claims, poll: float = 0.5) -> None:
    """Wait while other live writers (other ranks, other processes) still hold claims on unpublished shards,
    so that the store this writer returns shows all their progress; a torchrun process group also meets."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    while claims.live_elsewhere(range(store.n_shards)):
        time.sleep(poll)


def _check_dtype(computation: Computation) -> None:
    try:
        same = str(getattr(torch, computation.dtype)) == f"torch.{computation.dtype}" == f"torch.{np.dtype(computation.dtype)}"
    except (AttributeError, TypeError):
        same = False
    if not same:
        raise ValueError(f"computation {computation.name} has dtype {computation.dtype!r}; use a dtype name that "
                         "numpy and torch share, e.g. 'float32', 'float16', 'int16' or 'bool'")


def _codecs(compression, names: list[str]) -> dict[str, str | None]:
    """Output name -> codec (None: uncompressed) from a codec or a mapping of names / glob patterns."""
    if compression is None or isinstance(compression, str):
        chosen = {name: compression for name in names}
    else:
        chosen = {name: None for name in names}
        for pattern, codec in dict(compression).items():
            matched = fnmatch.filter(names, pattern)
            if not matched:
                raise ValueError(f"compression pattern {pattern!r} matches no recorded output; outputs are {names}")
            chosen.update({name: codec for name in matched})
    for name, codec in chosen.items():
        if codec is not None and codec not in CODECS:
            raise ValueError(f"compression {codec!r} for {name} is not available; use one of {CODECS} or None")
    return chosen


def _check_image_files(dataset) -> None:
    """Fail before the store exists if a file in ``dataset.samples.image_path`` is missing or empty."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return
    bad = [(i, p) for i, p in enumerate(samples["image_path"]) if not os.path.isfile(p) or os.path.getsize(p) == 0]
    if bad:
        listed = ", ".join(f"item {i}: {p}" for i, p in bad[:3])
        raise FileNotFoundError(f"{len(bad)} image file(s) are missing or empty ({listed}); restore them, or "
                                "pass on_error='skip' (--on-error skip) to record the other images")


def _item_error(dataset, index: int, error: str) -> ValueError:
    samples = getattr(dataset, "samples", None)
    where = ""
    if samples is not None and "image_path" in samples.columns:
        where = f" ({samples['image_path'].iloc[index]})"
    return ValueError(f"dataset item {index}{where} could not be loaded: {error}; fix or replace the file, or "
                      "pass on_error='skip' (--on-error skip) to record the other items and list this one in "
                      "store.skipped")


def _request(model, dataset, selections, reducers, computations, dtype, autocast, shard_size, codecs) -> dict:
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
    for name, codec in codecs.items():
        if codec is not None:
            outputs[name]["compression"] = codec
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


def _open_or_create(path, request, capture, dataset, device, batch_size, rank, on_error):
    """Open and check the store at `path`, or create it (rank 0; other ranks wait for its metadata).

    Returns the store and the image shape [C H W] (what a skipped item is replaced with in its batch)."""
    first = _first_loadable(dataset, on_error)
    images, labels, rows, sample_ids, extras, _ = _collate([first], bool(capture.batched), samples=request["samples"])
    _check_items(rows, sample_ids, labels, request["samples"])
    layout = capture.model.layout_for(images).to_dict()
    if not (path / METADATA_FILE).exists():
        if rank == 0:
            extras = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
            meta = _complete(request, capture, images.to(device), labels.to(device), extras, layout, batch_size)
            return create_store(path, meta, request), tuple(images.shape[1:])
        _wait_for(path / METADATA_FILE)
    store = ActivationStore(path)
    store.check_compatible(request, source="request")
    store.check_compatible({"layout": layout}, source="model")
    if store.meta["batch_size"] != batch_size:
        tqdm.write(f"note: {path} was recorded with batch_size {store.meta['batch_size']}; batches of "
                   f"{batch_size} may differ in the last bits from an uninterrupted run")
    return store, tuple(images.shape[1:])


def _first_loadable(dataset, on_error: str) -> dict:
    """The first item that loads (with on_error='skip'), or item 0; raises naming the file of a bad one."""
    items = _Items(dataset)
    for index in range(len(dataset) if on_error == "skip" else 1):
        item = items[index]
        if "error" not in item:
            return {**item, "index": index}
        if on_error == "raise":
            raise _item_error(dataset, index, item["error"])
    raise ValueError(f"none of the {len(dataset)} dataset items could be loaded; check the dataset's files")


def _complete(request, capture, images, labels, extras, layout, batch_size) -> dict:
    """Add the token layout, each output's shape (from a forward on the first sample) and the shard size."""
    start = time.perf_counter()
    probe = capture.run(images, labels, extras)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    per_sample = max(time.perf_counter() - start, 1e-6)  # a cold one-image forward: an upper bound per sample
    outputs = {name: {**spec, "shape": list(probe[name].shape[1:])} for name, spec in request["outputs"].items()}
    for kind, output in [("reducer", r) for r in capture.reducers] + [("computation", c) for c in capture.computations]:
        declared = tuple(output.shape(capture.model))
        if tuple(outputs[output.name]["shape"]) != declared:
            raise ValueError(f"{kind} {output.name} declares shape {declared} but produced "
                             f"{outputs[output.name]['shape']}")
    shard_size = request.get("shard_size")
    if shard_size is None:
        sample_bytes = sum(t[0].numel() * t.element_size() for t in probe.values())
        rows = int(max(1, min(_MAX_SHARD_SIZE, _SHARD_BYTES // sample_bytes, _SHARD_SECONDS / per_sample)))
        shard_size = rows // batch_size * batch_size or batch_size
    return {**request, "outputs": outputs, "layout": layout, "shard_size": shard_size,
            "batch_size": batch_size}


_ITEM_KEYS = ("image", "label", "sample_id")


def _collate(items: list[dict], extras: bool = False, image_shape: tuple | None = None,
             samples: Mapping[str, list] | None = None):
    """(images [b C H W], labels [b], rows, sample ids, the other item fields collated if `extras`, errors).

    An item that failed to load (``{"error", "index"}``) is replaced by a zero image with its listed sample
    id and label; `errors` lists ``(index, error)`` of those items."""
    errors = [(item["index"], item["error"]) for item in items if "error" in item]
    if errors:
        items = [{"image": torch.zeros(image_shape), "index": item["index"],
                  "label": samples["label"][item["index"]], "sample_id": samples["sample_id"][item["index"]]}
                 if "error" in item else item for item in items]
    other = {}
    if extras:
        for key in items[0].keys() - set(_ITEM_KEYS):
            try:
                other[key] = default_collate([item[key] for item in items])
            except (TypeError, RuntimeError, KeyError) as error:
                raise ValueError(f"item field {key!r} cannot be batched for the computations ({error}); give "
                                 "every item the same tensor shape or number for it") from None
    return (torch.stack([item["image"] for item in items]), torch.tensor([item["label"] for item in items]),
            [int(item["index"]) for item in items], [str(item["sample_id"]) for item in items], other, errors)


def _check_items(rows: list[int], sample_ids: list[str], labels: torch.Tensor, samples: Mapping[str, list]) -> None:
    """Raise unless the items of a batch (`rows`) have the sample ids and labels of .samples."""
    for column, values in (("sample_id", sample_ids), ("label", labels.tolist())):
        expected = [samples[column][r] for r in rows]
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
            raise TimeoutError(f"rank 0 did not create {file} within {timeout:.0f} s; start rank 0 (it creates "
                               "the store), or create the store first with a single run")
        time.sleep(0.2)


def _writer_failure(writer: _Writer, store: ActivationStore) -> BaseException:
    """The error to raise for a failed shard write, saying what is intact and how to resume."""
    error = writer.error
    if not isinstance(error, OSError):
        return error
    full = error.errno == errno.ENOSPC or "No space left" in str(error)
    what, then = ("disk full", "Free space and run") if full else (f"error ({error.strerror or error})", "Run")
    shard = f"shard {writer.shard}" if writer.shard is not None else "a shard"
    message = (f"{what} while writing {shard} of {store.path}; {len(store._listing())} complete shard(s) are "
               f"intact and the partial shard was removed. {then} the same record call again to resume")
    code = errno.ENOSPC if full else error.errno
    return OSError(code, message) if code is not None else OSError(message)
