"""The recorder: kill -9 and resume, two writers, a full disk, a read-only directory, bad hooks, reducers."""
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers.tiny import SyntheticImages, assert_same_store, check_log, record_tiny, tiny_model
from timm.models.vision_transformer import VisionTransformer

import vitlens
from vitlens import ActivationStore, HookedViT, NotRecordedError, StoreMismatchError, UnknownHookError
from analyses.class_embedding import ClassRankReducer
from vitlens.recorder import RecordingInterrupted, _Capture
from vitlens.shards import ShardWriter, new_writer_id

TESTS = Path(__file__).parent
BATCH, SHARD = 4, 8


def start_recorder(path, *args, env=None) -> subprocess.Popen:
    """`python -m helpers.record_tiny PATH ...` in a subprocess (stdout: "recording", then "done")."""
    return subprocess.Popen([sys.executable, "-m", "helpers.record_tiny", str(path), *args], cwd=TESTS,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process recording of 40 synthetic images."""
    root = tmp_path_factory.mktemp("reference")
    record_tiny(root / "40", SyntheticImages(40), batch_size=BATCH, shard_size=SHARD).close()
    return root


@pytest.mark.slow
def test_three_writers_with_kills_then_resume_equal_run_with_cache(tmp_path):
    """Three plain processes on one store, two of them SIGKILLed at random moments, then a resume."""
    path, rng, n = tmp_path / "three", random.Random(0), 160
    writers = [start_recorder(path, "--n", str(n), "--delay", "0.01") for _ in range(3)]
    for writer in writers:
        assert writer.stdout.readline() == "recording\n", writer.stderr.read()
    killed = set()
    for victim in rng.sample(writers, 2):
        time.sleep(rng.uniform(0.2, 1.0))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed.add(victim.pid)
    for writer in writers:
        writer.communicate(timeout=300)
    record_tiny(path, SyntheticImages(n), batch_size=BATCH, shard_size=SHARD).close()  # the resume, in this process
    check_log(path, killed)
    assert not [p for p in (path / "shards").iterdir() if p.suffix != ".h5"], "temporary files or claims left"
    model, dataset = tiny_model(), SyntheticImages(n)
    with ActivationStore(path) as store:
        hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "hook_logits"]
        for start in range(0, n, BATCH):  # the recorder's batches, through run_with_cache directly
            with torch.inference_mode():
                _, cache = model.run_with_cache(dataset.images[start:start + BATCH], names_filter=hooks)
            expected = {hook: cache[hook] for hook in hooks}
            expected["blocks.0.attn.hook_pattern"] = expected["blocks.0.attn.hook_pattern"][:, :, :1]  # CLS queries
            for hook in hooks:
                assert store[hook][start:start + BATCH].tobytes() == expected[hook].contiguous().numpy().tobytes(), \
                    (hook, start)



def test_the_next_writer_removes_short_lived_files_of_dead_processes_only(tmp_path, reference):
    """A writer killed while writing a claim, the index or store.json, or while taking a claim over, leaves a
    ``.tmp`` or ``.expired`` file naming its host and pid: the next writer removes those of processes that are
    gone (this host) or older than the claim timeout (another host), and nothing of live ones."""
    path = tmp_path / "store"
    shutil.copytree(reference / "40", path)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)  # a pid that no longer exists
    host, shards = new_writer_id().rsplit("-", 2)[0], path / "shards"
    gone = [shards / f".shard_00003.claim.{host}-{dead}-0123abcd.tmp",
            shards / f".shard_00003.claim.{host}-{dead}-0123abcd.expired",
            path / f".index.json.{host}-{dead}-89abcdef0123.tmp",
            shards / f".shard_00001.claim.elsewhere-{os.getpid()}-0123abcd.tmp"]  # another host's, an hour old
    kept = [shards / f".shard_00004.claim.{host}-{os.getpid()}-0123abcd.tmp",  # ours: alive
            shards / f".shard_00002.claim.elsewhere-{dead}-0123abcd.tmp",  # another host's, fresh
            path / f".store.json.{dead}.tmp"]  # not a vitlens name: left alone
    for file in gone + kept:
        file.write_bytes(b"partial")
    os.utime(gone[-1], (time.time() - 3600, time.time() - 3600))
    record_tiny(path, SyntheticImages(40), batch_size=BATCH, shard_size=SHARD).close()
    assert [f.name for f in gone if f.exists()] == [] and all(f.exists() for f in kept)
    assert_same_store(path, reference / "40")

@pytest.mark.slow
def test_two_writers_give_the_same_store_as_one(tmp_path, reference):
    path = tmp_path / "two"
    writers = [start_recorder(path, "--n", "40", env={"RANK": str(rank), "WORLD_SIZE": "2"}) for rank in (1, 0)]
    for writer in writers:
        finish(writer)
    assert_same_store(path, reference / "40")


def test_resume_after_an_exception_mid_shard(tmp_path, reference, monkeypatch, capsys):
    path, dataset = tmp_path / "store", SyntheticImages(40)
    calls = iter(range(100))  # call 0 probes the shapes, then one call per batch of 4
    original_run = _Capture.run
    monkeypatch.setattr(_Capture, "run", lambda self, *a: original_run(self, *a) if next(calls) != 8 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD)
    assert sorted(p.name for p in (path / "shards").iterdir()) == [f"shard_0000{i}.h5" for i in range(3)]
    monkeypatch.undo()
    record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD, progress=True)
    captured = capsys.readouterr()
    assert "24 of 40 samples already recorded" in captured.out + captured.err
    assert_same_store(path, reference / "40")


def fail_on_shard(shard: int):
    """A `ShardWriter.write` that finds the disk full on the second batch of shard `shard`."""
    write = ShardWriter.write

    def write_or_fill_up(self, offset, arrays, skipped=()):
        if self.shard == shard and offset > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, offset, arrays, skipped)

    return write_or_fill_up


def test_full_disk_keeps_complete_shards_and_resumes(tmp_path, reference, monkeypatch):
    path, dataset = tmp_path / "store", SyntheticImages(40)
    monkeypatch.setattr(ShardWriter, "write", fail_on_shard(2))
    with pytest.raises(OSError, match="disk full while writing shard 2.*2 complete shard.*intact.*resume") as info:
        record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD)
    assert info.value.errno == errno.ENOSPC
    shards = {p.name: p.read_bytes() for p in (path / "shards").iterdir()}
    assert sorted(shards) == ["shard_00000.h5", "shard_00001.h5"]  # no temporary file left
    monkeypatch.undo()
    record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD)
    assert_same_store(path, reference / "40")
    assert all((path / "shards" / name).read_bytes() == data for name, data in shards.items())


@contextmanager
def small_filesystem(folder: Path, size: str):
    """A real tmpfs of `size` mounted at `folder` (skips the test where mounting is not allowed)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_really_full_disk(tmp_path, reference):
    dataset = SyntheticImages(40)
    with small_filesystem(tmp_path / "small", "160k") as small:
        with pytest.raises(OSError, match="disk full") as info:
            record_tiny(small / "store", dataset, batch_size=BATCH, shard_size=SHARD)
        assert info.value.errno == errno.ENOSPC
        assert not list((small / "store" / "shards").glob("*.tmp"))
        with ActivationStore(small / "store") as store:
            done = int(store.done.sum())
        shutil.copytree(small / "store", tmp_path / "moved")
    assert 0 < done < 40
    record_tiny(tmp_path / "moved", dataset, batch_size=BATCH, shard_size=SHARD)
    assert_same_store(tmp_path / "moved", reference / "40")


@contextmanager
def read_only(folder: Path):
    """Make `folder` really read-only: chmod for users; for root (whom chmod does not stop), chattr +i."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    else:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("cannot make a directory read-only for root here (chattr +i)")
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # noqa: E731
    try:
        yield folder
    finally:
        undo()


def test_read_only_directory_fails_before_compute_and_stays_readable(tmp_path, reference, monkeypatch):
    path, dataset = tmp_path / "store", SyntheticImages(40)
    half = record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD, rank=0, world_size=2)
    expected = half["hook_logits"][0:8]
    half.close()
    (path / "index.json").unlink()
    monkeypatch.setattr(_Capture, "run", lambda *a: pytest.fail("computed before checking the directory"))
    with read_only(path):
        with pytest.raises(PermissionError, match=f"cannot write to {path}.*nothing was computed"):
            record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD)
        with ActivationStore(path) as store:  # the index is rebuilt in memory
            np.testing.assert_array_equal(store["hook_logits"][0:8], expected)
    assert not (path / "index.json").exists()
    with read_only(tmp_path):
        with pytest.raises(PermissionError, match="nothing was computed"):
            record_tiny(tmp_path / "new", dataset, batch_size=BATCH, shard_size=SHARD)
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD)
    assert_same_store(path, reference / "40")


@pytest.mark.parametrize("hooks, tokens, error, message", [
    (["blocks.0.hook_resid_pots"], "all", UnknownHookError, "blocks.0.hook_resid_post"),
    (["blocks.*.hook_nothing"], "all", UnknownHookError, "no hook matches 'blocks.*.hook_nothing'"),
    (["blocks.0"], "all", UnknownHookError, "Unknown hook name .blocks.0."),
    (["hook_logits"], "cls", ValueError, "hook_logits has no token axis"),
    (["blocks.0.hook_resid_post"], [3, 99], ValueError, r"indices in \[0, 17\)"),
    ({"blocks.0.hook_resid_post": "cls"}, "patches", ValueError, "tokens='patches' applies only to hooks given"),
])
def test_bad_hooks_and_tokens_fail_before_anything_is_written(tmp_path, hooks, tokens, error, message):
    with pytest.raises(error, match=message):
        vitlens.record(tiny_model(), SyntheticImages(8), tmp_path / "store", hooks=hooks, tokens=tokens)
    with pytest.raises(UnknownHookError, match="hook_resid_post"):
        vitlens.record(tiny_model(), SyntheticImages(8), tmp_path / "store",
                       reducers=[ClassRankReducer(hook="hook_resid_pots")])
    assert not (tmp_path / "store").exists()


def test_token_selections(tmp_path):
    model = tiny_model(reg_tokens=2)
    dataset = SyntheticImages(8)
    store = vitlens.record(model, dataset, tmp_path / "store", dtype="float32", progress=False, hooks={
        "blocks.1.hook_resid_post": "cls", "blocks.0.hook_resid_post": "registers",
        "blocks.0.mlp.hook_post": [0, 5, 18], "blocks.1.attn.hook_q": "patches"})
    with torch.inference_mode():
        _, cache = model.run_with_cache(dataset.images, names_filter=list(store.keys()))
    selected = {"blocks.1.hook_resid_post": [0], "blocks.0.hook_resid_post": [1, 2],
                "blocks.0.mlp.hook_post": [0, 5, 18], "blocks.1.attn.hook_q": list(range(3, 19))}
    for hook, tokens in selected.items():
        assert store[hook].tokens == tuple(tokens)
        np.testing.assert_array_equal(store[hook][:], cache[hook][:, tokens].numpy(), err_msg=hook)


def test_class_rank_reducer_matches_the_projection_of_cached_residuals(tmp_path):
    model, dataset = tiny_model(), SyntheticImages(16)
    store = vitlens.record(model, dataset, tmp_path / "ranks", hooks="hook_logits",
                           reducers=[ClassRankReducer(precision="float32")], dtype="float32", batch_size=16,
                           progress=False)
    ranks = store["class_rank"][:]
    assert ranks.dtype == np.int16 and ranks.shape == (16, 2, 17)
    labels = torch.tensor(dataset.samples.label)
    with torch.inference_mode():
        _, cache = model.run_with_cache(dataset.images, names_filter=lambda name: name.endswith("resid_post"))
        for layer in range(2):
            logits = model.unembed(cache["resid_post", layer])  # [b pos classes]
            label_logit = logits[torch.arange(16), :, labels][..., None]
            np.testing.assert_array_equal(ranks[:, layer], (logits > label_logit).sum(-1).numpy())
    final = store["hook_logits"][:]
    expected_cls_rank = (final > final[np.arange(16), labels.numpy()][:, None]).sum(-1)
    np.testing.assert_array_equal(ranks[:, -1, 0], expected_cls_rank)  # CLS of the last layer = the logits
    assert store.outputs["class_rank"].reducer == {"class": "ClassRankReducer", "hook": "hook_resid_post",
                                                   "name": "class_rank", "precision": "float32"}


@pytest.fixture(scope="module")
def thousand_classes():
    """A tiny ViT with 1000 classes, a random final norm and head bias, random residuals and labels."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, num_classes=1000, embed_dim=48, depth=1, num_heads=2)
    with torch.no_grad():
        for tensor in (vit.norm.weight, vit.norm.bias, vit.head.bias):
            tensor.normal_(0.5, 0.5)
    resid = torch.randn(6, 17, 48) * 3 + torch.randn(48)
    return HookedViT.from_timm(vit, tag="thousand"), resid, torch.randint(0, 1000, (6,))


def rank_bounds(normed, W, b, labels, tolerance):
    """(lowest, highest) rank consistent with float64 logits known to within `tolerance` [b pos classes]."""
    logits = normed.double() @ W.double() + b.double()
    diff = logits - logits.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1))
    diff[torch.arange(len(labels)), :, labels] = -1.0  # the label itself never counts
    return (diff > tolerance).sum(-1), (diff > -tolerance).sum(-1)


def test_class_rank_precisions_against_float64_logits(thousand_classes):
    model, resid, labels = thousand_classes
    with torch.inference_mode():
        normed, W, b = model.final_norm(resid), model.W_U, model.b_U
        magnitude = normed.abs().double() @ W.abs().double() + b.abs().double()  # sum_i |z_i W_ic| + |b_c|
        label_magnitude = magnitude.gather(-1, labels.view(-1, 1, 1).expand(-1, 17, 1))
        fp32 = ClassRankReducer(precision="float32").reduce(model, resid, labels).long()
        bf16 = ClassRankReducer(precision="bfloat16").reduce(model, resid, labels).long()
        exact = rank_bounds(normed, W, b, labels, 0.0)[0]
        # float32: exact but for float32 rounding; bfloat16: only classes within the documented bound move
        lowest, highest = rank_bounds(normed, W, b, labels, 1e-5 * (magnitude + label_magnitude))
        assert ((lowest <= fp32) & (fp32 <= highest)).all() and (fp32 == exact).float().mean() > 0.99
        lowest, highest = rank_bounds(normed, W, b, labels, 2 ** -7 * (magnitude + label_magnitude))
        assert ((lowest <= bf16) & (bf16 <= highest)).all()
        assert (bf16 != exact).any()  # the bound is needed: rounding does move classes here
        # and bfloat16 is exact for the rounded operands, up to float32 summation
        z, Wr, br = normed.bfloat16(), W.bfloat16(), b.bfloat16()
        lowest, highest = rank_bounds(z, Wr, br, labels, 1e-5 * (magnitude + label_magnitude))
        assert ((lowest <= bf16) & (bf16 <= highest)).all()
        assert (bf16 == rank_bounds(z, Wr, br, labels, 0.0)[0]).float().mean() > 0.99


def test_class_rank_ignores_the_forward_autocast(thousand_classes):
    model, resid, labels = thousand_classes
    with torch.inference_mode():
        expected = ClassRankReducer(precision="float32").reduce(model, resid, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ClassRankReducer(precision="float32").reduce(model, resid, labels), expected)
            bf16_logits = model.unembed(resid)  # what a reducer under autocast would see: bfloat16 ties
        assert bf16_logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision 'float16'"):
        ClassRankReducer(precision="float16")


@pytest.mark.parametrize("options, message", [
    (dict(batch_size=0), "batch_size must be a positive number of images, got 0"),
    (dict(shard_size=0), "shard_size must be a positive number of samples, or None.*got 0"),
    (dict(batch_size=2.5), "batch_size must be a positive number of images, got 2.5"),
    (dict(shard_size=3.5), "shard_size must be a positive number of samples, or None.*got 3.5"),
    (dict(rank=1, world_size=1), r"rank 1 is not in \[0, world_size=1\): pass 0 <= rank < world_size"),
    (dict(rank=-1, world_size=2), r"rank -1 is not in \[0, world_size=2\)"),
    (dict(rank=0, world_size=0), r"rank 0 is not in \[0, world_size=0\)"),
])
def test_bad_batch_shard_size_or_rank_fail_before_anything_is_written(tmp_path, monkeypatch, options, message):
    monkeypatch.setattr("vitlens.recorder._wait_for", lambda file: pytest.fail(f"waited for {file}"))
    with pytest.raises(ValueError, match=message):
        record_tiny(tmp_path / "store", SyntheticImages(8), **{"batch_size": BATCH, **options})
    assert not (tmp_path / "store").exists()


class MislabelledItem(SyntheticImages):
    """Item `row` carries another label than dataset.samples lists for it."""

    def __init__(self, n: int, row: int):
        super().__init__(n)
        self.row = row

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {**item, "label": (item["label"] + 1) % 10} if index == self.row else item


@pytest.mark.parametrize("row", [0, 13])
def test_item_labels_must_match_the_samples(tmp_path, row):
    dataset = MislabelledItem(40, row)
    listed = int(dataset.samples.label[row])
    with pytest.raises(ValueError, match=f"dataset item {row} has label {(listed + 1) % 10} but dataset.samples "
                                         f"lists {listed}: the items and .samples must agree"):
        record_tiny(tmp_path / "store", dataset, batch_size=BATCH, shard_size=SHARD)
    if row == 0:  # checked before the store is created
        assert not (tmp_path / "store").exists()
    else:
        assert sorted(p.name for p in (tmp_path / "store" / "shards").iterdir()) == ["shard_00000.h5"]


def test_resume_lists_the_shards_once(tmp_path, monkeypatch):
    calls = []
    listing = ActivationStore.shards_on_disk
    monkeypatch.setattr(ActivationStore, "shards_on_disk", lambda self: calls.append(1) or listing(self))
    record_tiny(tmp_path / "store", SyntheticImages(40), batch_size=BATCH, shard_size=BATCH).close()  # 10 shards
    assert len(calls) <= 3  # creating the store, finding the shards to do, the final refresh


class InputGradient(vitlens.Computation):
    """|d logit[label] / d image| summed over channels: [H W], needs autograd."""

    name, dtype, needs_grad = "map.input_grad", "float32", True

    def shape(self, model):
        return (32, 32)

    def compute(self, model, images, labels):
        images = images.clone().requires_grad_(True)
        model(images).gather(1, labels[:, None]).sum().backward()
        return images.grad.abs().sum(1)


class MaskedLogit(vitlens.Computation):
    """The label logit times the number of marked tokens in the item's token_mask (uses the batch fields)."""

    name, dtype = "masked_logit", "float64"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def shape(self, model):
        return ()

    def compute(self, model, images, labels, batch=None):
        logits = model(images).gather(1, labels[:, None])[:, 0]
        return self.scale * logits * batch["token_mask"].flatten(1).sum(1)


class WithMasks(SyntheticImages):
    def __getitem__(self, index):
        return {**super().__getitem__(index), "token_mask": torch.arange(16).reshape(4, 4) < index % 5}


def test_computations_store_per_image_results_with_autograd_and_batch_fields(tmp_path, monkeypatch):
    model, dataset = tiny_model(), WithMasks(12)
    forwards = []
    run_with_hooks = HookedViT.run_with_hooks
    monkeypatch.setattr(HookedViT, "run_with_hooks", lambda *a, **k: forwards.append(1) or run_with_hooks(*a, **k))
    store = vitlens.record(model, dataset, tmp_path / "maps", computations=[InputGradient(), MaskedLogit(2.0)],
                           batch_size=4, shard_size=8, progress=False)
    assert forwards == []  # computations alone run no hooked forward
    labels = torch.tensor(dataset.samples.label)
    images = dataset.images.clone().requires_grad_(True)
    model.vit(images).gather(1, labels[:, None]).sum().backward()  # plain timm, per-image gradients
    np.testing.assert_allclose(store["map.input_grad"][:], images.grad.abs().sum(1).numpy(), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        label_logits = model.vit(dataset.images).gather(1, labels[:, None])[:, 0].double()
    marked = torch.tensor([i % 5 for i in range(12)], dtype=torch.float64)
    np.testing.assert_allclose(store["masked_logit"][:], (2.0 * label_logits * marked).numpy(), rtol=1e-6)
    assert store.outputs["masked_logit"].computation == {"class": "MaskedLogit", "scale": 2.0}
    with pytest.raises(vitlens.StoreMismatchError, match=r"output set differs at masked_logit.computation.scale"):
        vitlens.record(model, dataset, tmp_path / "maps", computations=[InputGradient(), MaskedLogit(3.0)],
                       batch_size=4, shard_size=8, progress=False)


def test_computation_of_the_wrong_shape_or_dtype_is_refused(tmp_path):
    class Wrong(InputGradient):
        def shape(self, model):
            return (16, 16)

    with pytest.raises(ValueError, match=r"computation map.input_grad declares shape \(16, 16\) but produced \[32, 32\]"):
        vitlens.record(tiny_model(), SyntheticImages(8), tmp_path / "a", computations=[Wrong()], progress=False)
    bad = InputGradient()
    bad.dtype = "float"
    with pytest.raises(ValueError, match="computation map.input_grad has dtype 'float'"):
        vitlens.record(tiny_model(), SyntheticImages(8), tmp_path / "b", computations=[bad], progress=False)


class BrokenItem(SyntheticImages):
    """Item `row` cannot be loaded; samples list an image_path per item (all exist but that one's is damaged)."""

    def __init__(self, n: int, row: int, folder: Path):
        super().__init__(n)
        self.row = row
        paths = []
        for i in range(n):
            paths.append(folder / f"img{i:04d}.png")
            paths[-1].write_bytes(b"png")
        self.samples["image_path"] = [str(p) for p in paths]

    def __getitem__(self, index: int) -> dict:
        if index == self.row:
            raise OSError(f"image file is truncated: {self.samples.image_path[index]}")
        return super().__getitem__(index)


def test_a_broken_image_is_named_or_skipped(tmp_path, reference):
    (tmp_path / "images").mkdir()
    dataset = BrokenItem(40, 13, tmp_path / "images")
    with pytest.raises(ValueError, match=r"dataset item 13 \(.*img0013.png\) could not be loaded: OSError: image "
                                         r"file is truncated.*on_error='skip'"):
        record_tiny(tmp_path / "raise", dataset, batch_size=BATCH, shard_size=SHARD)
    (tmp_path / "images" / "img0030.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image file.*img0030.png"):
        record_tiny(tmp_path / "missing", dataset, batch_size=BATCH, shard_size=SHARD)
    assert not (tmp_path / "missing").exists()  # reported before the store exists
    store = record_tiny(tmp_path / "skip", dataset, batch_size=BATCH, shard_size=SHARD, on_error="skip")
    assert store.skipped[["index", "sample_id"]].values.tolist() == [[13, "img0013"]]
    assert "truncated" in store.skipped.error[0] and not store.done[13] and int(store.done.sum()) == 39
    with pytest.raises(NotRecordedError, match=r"sample 13 was skipped \(OSError: image file is truncated"):
        store["hook_logits"][13]
    kept = np.arange(40) != 13
    expected = ActivationStore(reference / "40")
    for name in store.keys():
        assert store[name][kept].tobytes() == expected[name][kept].tobytes(), name
    assert ActivationStore(tmp_path / "skip").skipped.equals(store.skipped)  # a new reader sees them too


def test_ctrl_c_keeps_complete_shards_and_says_how_to_resume(tmp_path, reference, monkeypatch):
    path, dataset = tmp_path / "store", SyntheticImages(40)
    calls = iter(range(100))  # call 0 probes the shapes, then one call per batch of 4

    def interrupted(self, *args):
        if next(calls) == 6:
            raise KeyboardInterrupt
        return original(self, *args)

    original = _Capture.run
    monkeypatch.setattr(_Capture, "run", interrupted)
    with pytest.raises(RecordingInterrupted, match=r"^interrupted: run the same command to resume "
                                                   r"\(16 of 40 samples kept\)$") as info:
        record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD)
    assert isinstance(info.value, KeyboardInterrupt) and (info.value.kept, info.value.total) == (16, 40)
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["shard_00000.h5", "shard_00001.h5"]
    monkeypatch.undo()
    record_tiny(path, dataset, batch_size=BATCH, shard_size=SHARD)
    assert_same_store(path, reference / "40")


def test_compressed_outputs_read_back_exactly(tmp_path, reference):
    for codec in ("gzip", "lzf"):
        path = tmp_path / codec
        store = record_tiny(path, SyntheticImages(40), batch_size=BATCH, shard_size=SHARD,
                            compression={"blocks.*": codec, "class_rank": "gzip"})
        assert_same_store(path, reference / "40")
        with h5py.File(path / "shards" / "shard_00002.h5") as f:
            assert f["blocks.1.hook_resid_post"].compression == codec and f["hook_logits"].compression is None
        assert store.outputs["blocks.0.hook_resid_post"].compression == codec
    with pytest.raises(ValueError, match="compression 'zstd' for blocks.0.hook_resid_post is not available"):
        record_tiny(tmp_path / "bad", SyntheticImages(8), compression="zstd")
    with pytest.raises(StoreMismatchError, match="output set differs at blocks.0.hook_resid_post.compression"):
        record_tiny(tmp_path / "gzip", SyntheticImages(40), batch_size=BATCH, shard_size=SHARD, compression="lzf")


def test_the_shuffled_loader_reads_every_sample_once_per_epoch_in_blocks(reference):
    store = ActivationStore(reference / "40")
    loader = store.loader(["hook_logits", "class_rank"], batch_size=6, seed=3, block_size=4)
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        rows = torch.cat([b["index"] for b in batches]).numpy()
        assert sorted(rows) == list(range(40)) and len(batches) == 7
        for batch in batches:
            np.testing.assert_array_equal(batch["hook_logits"].numpy(), store["hook_logits"][batch["index"].numpy()])
            starts = {int(i) // 4 for i in batch["index"]}  # whole blocks of 4 consecutive samples
            assert len(starts) <= 3
    order = [torch.cat([b["index"] for b in batches]).tolist() for batches in epochs]
    assert order[0] != order[1] and order[0] != list(range(40))
    again = torch.cat([b["index"] for b in store.loader("hook_logits", 6, seed=3, block_size=4)]).tolist()
    assert again == order[0]
    plain = torch.cat([b["index"] for b in store.loader("hook_logits", 6, shuffle=False)]).tolist()
    assert plain == list(range(40))
    with pytest.raises(ValueError, match="loader batch_size must be a positive number"):
        store.loader("hook_logits", 0)


@pytest.mark.parametrize("block_size, starts", [(4, range(0, 40, 4)), (8, range(0, 40, 8)), (12, range(0, 40, 8)),
                                                (16, [0, 16, 32]), (64, [0])])
def test_loader_blocks_are_whole_small_shards_or_runs_within_a_shard(reference, block_size, starts):
    """Shards of 8: blocks below 8 samples cut a shard, larger ones are block_size // 8 whole shards."""
    store = ActivationStore(reference / "40")
    loader = store.loader("hook_logits", 5, seed=1, block_size=block_size)
    stops = [*starts[1:], 40]
    assert [b.tolist() for b in loader.sampler.blocks] == [list(range(a, b)) for a, b in zip(starts, stops)]
    batches = list(loader)
    rows = np.concatenate([b["index"].numpy() for b in batches])
    assert sorted(rows) == list(range(40))
    logits = np.concatenate([b["hook_logits"].numpy() for b in batches])
    with h5py.File(reference / "40" / "shards" / "shard_00000.h5") as f:  # the first shard, through h5py
        first = f["hook_logits"][:]
    np.testing.assert_array_equal(logits[rows < 8][np.argsort(rows[rows < 8])], first)
