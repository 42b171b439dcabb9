"""Recorder throughput against its two ceilings: the disk (dd) and the model's plain forward.

vit_base_patch16_224 (timm, random init) over in-memory random images; bf16 autocast on CUDA, fp32 on CPU.
Every measurement is the fastest of ``--repeats`` interleaved passes over the whole dataset (a recording
includes creating its store and writing its index):

1. the plain forward, with timm's fused attention and with the eager path (``fused_attn=False``);
2. the disk write bandwidth with ``dd ... conv=fdatasync`` in the stores' folder;
3. recording ``hook_resid_post`` of all 12 layers, all tokens, in float16: images/s, GB/s, and
   throughput / min(dd bandwidth in images/s, forward images/s)          (goal >= 0.8);
4. recording only the CLS token of those hooks plus ``ClassRankReducer`` (every token, every layer), in
   float32 and in bfloat16 precision: throughput / the plain eager forward   (goal >= 0.9), and the ratio
   to the fused forward. The float32 projection is about 10% of ViT-B's compute, so against the fused
   forward its ceiling is about 0.91.

On CUDA it also checks that the first recorded batch equals ``run_with_cache`` under the same autocast.

    python bench/record_throughput.py                     # CPU: 48 images, batch 8 (about 3 minutes)
    python bench/record_throughput.py --images 8192 --batch-size 256 --num-workers 8   # one GPU
"""
from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import timm
import torch
from torch.utils.data import DataLoader, Dataset

import vitlens
from common import print_ratio, time_interleaved
from vitlens import HookedViT
from analyses.class_embedding import ClassRankReducer

HOOKS = "blocks.*.hook_resid_post"


class RandomImages(Dataset):
    """`n` items cycling through a pool of random 3x224x224 images (no decoding: the recorder is measured)."""

    def __init__(self, n: int, pool: int = 64):
        self.images = torch.randn(min(n, pool), 3, 224, 224, generator=torch.Generator().manual_seed(0))
        self.samples = pd.DataFrame({"sample_id": [f"random{i:06d}" for i in range(n)],
                                     "label": [i % 1000 for i in range(n)]})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index % len(self.images)], "label": index % 1000,
                "sample_id": self.samples.sample_id[index], "index": index}


def forward_pass(model, dataset, args, device, autocast) -> None:
    """One plain forward over the dataset, through the same kind of DataLoader as the recorder's."""
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for batch in loader:
            model(batch["image"].to(device, non_blocking=True))


def recording(model, dataset, path: Path, **options) -> None:
    """One whole recording into a new store at `path` (set-up, probe, writes and index included)."""
    vitlens.record(model, dataset, path, **options).close()
    shutil.rmtree(path)


def dd_bandwidth(folder: Path, n_bytes: int) -> float:
    """Bytes/s of ``dd if=/dev/zero bs=1M conv=fdatasync`` writing `n_bytes` into `folder`."""
    target = folder / "dd.bin"
    count = max(256, n_bytes >> 20)
    result = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={count}", "conv=fdatasync"],
                            capture_output=True, text=True, check=True)
    target.unlink()
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", result.stderr)
    return int(match.group(1)) / float(match.group(2))


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "shards").glob("*.h5"))


def check_first_batch(model, store, dataset, args, device, autocast) -> float:
    """Max |stored - run_with_cache| over the first batch (same batch, same autocast)."""
    images = torch.stack([dataset[i]["image"] for i in range(args.batch_size)]).to(device)
    names = list(store.keys())
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        _, cache = model.run_with_cache(images, names_filter=names)
    return max((torch.from_numpy(store[n][:args.batch_size]).float() - cache[n].half().float().cpu()).abs().max().item()
               for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="default: 48 on CPU, 8192 on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 256 on CUDA")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes; the fastest of each counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.images = args.images or (8192 if cuda else 48)
    args.batch_size = args.batch_size or (256 if cuda else 8)
    autocast = torch.bfloat16 if cuda else None
    if not cuda:
        torch.set_num_threads(1)

    model = HookedViT.from_timm(timm.create_model("vit_base_patch16_224", pretrained=False),
                                tag="vit_base_patch16_224-random").to(device)
    model.weights_hash()  # cached: not part of any timing
    eager = copy.deepcopy(model.vit)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    dataset = RandomImages(args.images)
    folder = Path(tempfile.mkdtemp(prefix="vitlens-bench-", dir=args.dir))
    options = dict(batch_size=args.batch_size, device=device, num_workers=args.num_workers, autocast=autocast,
                   progress=False)
    print(f"vit_base_patch16_224 on {device} ({'bf16 autocast' if cuda else 'fp32, 1 thread'}), "
          f"{args.images} images, batch {args.batch_size}, fastest of {args.repeats} interleaved passes, "
          f"stores in {folder}")
    try:
        all_tokens = folder / "all_tokens"
        cls_only = dict(hooks=HOOKS, tokens="cls", **options)
        seconds = time_interleaved({
            "forward": lambda: forward_pass(model, dataset, args, device, autocast),
            "eager": lambda: forward_pass(eager, dataset, args, device, autocast),
            "all tokens": lambda: recording(model, dataset, all_tokens, hooks=HOOKS, **options),
            "cls + rank": lambda: recording(model, dataset, folder / "cls",
                                            reducers=[ClassRankReducer(precision="float32")], **cls_only),
            "cls + rank bf16": lambda: recording(model, dataset, folder / "cls",
                                                 reducers=[ClassRankReducer(precision="bfloat16")], **cls_only),
        }, device, repeats=args.repeats, warmup=0)
        rate = {name: args.images / s for name, s in seconds.items()}
        forward, eager_forward = rate["forward"], rate["eager"]
        print(f"plain forward              {forward:10.2f} images/s  (timm, fused attention)")
        print(f"eager forward              {eager_forward:10.2f} images/s  (timm fused_attn=False)")

        vitlens.record(model, dataset, all_tokens, hooks=HOOKS, **options).close()
        n_bytes = store_bytes(all_tokens)
        if cuda:
            with vitlens.ActivationStore(all_tokens) as store:
                diff = check_first_batch(model, store, dataset, args, device, autocast)
            print(f"first batch vs run_with_cache: max |diff| {diff:.3g}")
        shutil.rmtree(all_tokens)
        disk = dd_bandwidth(folder, n_bytes)
        disk_rate = disk / (n_bytes / args.images)
        print(f"dd (bs=1M, fdatasync)      {disk / 1e9:10.2f} GB/s = {disk_rate:.1f} images/s of 12 x 197 x 768 fp16")
        print(f"record all tokens          {rate['all tokens']:10.2f} images/s  "
              f"{n_bytes / seconds['all tokens'] / 1e9:.2f} GB/s")
        print_ratio("all tokens / min(dd, forward)", rate["all tokens"] / min(disk_rate, forward), 0.8)
        for name in ("cls + rank", "cls + rank bf16"):
            print(f"record {name:<19s} {rate[name]:10.2f} images/s")
            print_ratio(f"{name} / eager forward", rate[name] / eager_forward, 0.9)
            print(f"  {name + ' / fused forward':<60s} {rate[name] / forward:6.3f}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
