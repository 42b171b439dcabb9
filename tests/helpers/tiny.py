"""A tiny random HookedViT and a synthetic image dataset, shared by the store tests and their subprocesses."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

import vitlens
from vitlens import ActivationStore, HookedViT
from analyses.class_embedding import ClassRankReducer

N_CLASSES = 10
# What the tiny stores record: all tokens, a token subset of an attention pattern, a tokenless hook, ranks.
HOOKS = {"blocks.*.hook_resid_post": "all", "blocks.0.attn.hook_pattern": "cls", "hook_logits": "all"}


def tiny_model(seed: int = 0, reg_tokens: int = 0, tag: str = "tiny-test") -> HookedViT:
    """2 blocks, d_model 32, 32x32 images in 4x4 patches of 8: 17 tokens (+ registers)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=N_CLASSES, embed_dim=32, depth=2,
                            num_heads=2, mlp_ratio=2, reg_tokens=reg_tokens)
    return HookedViT.from_timm(vit, tag=tag)


class SyntheticImages(Dataset):
    """`n` random 3x32x32 images from a fixed seed, in the vitlens item format, optionally slow to load."""

    def __init__(self, n: int = 40, seed: int = 0, delay: float = 0.0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=generator)
        labels = torch.randint(0, N_CLASSES, (n,), generator=generator).tolist()
        self.samples = pd.DataFrame({"sample_id": [f"img{i:04d}" for i in range(n)], "label": labels})
        self.delay = delay

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        if self.delay:
            import time

            time.sleep(self.delay)
        return {"image": self.images[index], "label": int(self.samples.label[index]),
                "sample_id": self.samples.sample_id[index], "index": index}


def record_tiny(path, dataset: SyntheticImages, **kwargs) -> ActivationStore:
    """Record :data:`HOOKS` and class ranks of :func:`tiny_model` in float32 (no progress bar)."""
    options = dict(hooks=HOOKS, reducers=[ClassRankReducer(precision="float32")], dtype="float32", progress=False)
    return vitlens.record(tiny_model(), dataset, path, **{**options, **kwargs})


def store_arrays(path) -> dict[str, np.ndarray]:
    """Every output of the store at `path`, read whole (for bit-for-bit comparisons)."""
    with ActivationStore(path) as store:
        assert store.done.all(), f"{path}: {int(store.done.sum())} of {len(store)} samples recorded"
        return {name: store[name][:] for name in store.keys()}


def assert_same_store(path, reference) -> None:
    """The store at `path` holds bitwise the same samples and arrays as the one at `reference`."""
    a, b = store_arrays(path), store_arrays(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"
    assert ActivationStore(path).samples.equals(ActivationStore(reference).samples)


def write_log(path) -> list[dict]:
    return [json.loads(line) for line in (path / "writes.log").read_text().splitlines()]


def check_log(path, killed: set[int]) -> None:
    """Each shard published once; a shard claimed twice only after its earlier claimants were killed."""
    events = write_log(path)
    published = [e["shard"] for e in events if e["event"] == "publish"]
    assert len(published) == len(set(published)), "a shard was published twice"
    assert not [e for e in events if e["event"] == "duplicate"], "a shard was computed twice by live writers"
    for shard in set(e["shard"] for e in events):
        claimants = [e["writer"] for e in events if e["event"] == "claim" and e["shard"] == shard]
        for writer in claimants[:-1]:
            assert int(writer.split("-")[-2]) in killed, f"shard {shard} was claimed by live writers {claimants}"
