"""Shared scaffolding of the bench scripts: flags, the device, a random ViT-B/16, interleaved timing, ratios."""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def device_and_dtype() -> tuple[torch.device, torch.dtype, int]:
    """CUDA with bf16 and a large batch when a GPU is present, else the CPU with fp32 and batch 8."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, 256
    torch.set_num_threads(1)
    return torch.device("cpu"), torch.float32, 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                     warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each function: the fastest of `repeats` calls (noise on a shared machine only adds
    time), the calls interleaved so that drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def print_ratio(label: str, value: float, goal: float) -> None:
    verdict = "ok" if value >= goal else "BELOW GOAL"
    print(f"  {label:<60s} {value:6.3f}  (goal >= {goal}, {verdict})")


class RandomImages(torch.utils.data.Dataset):
    """`n` random images [3 size size] (seeded) as a vitlens dataset: items ``{"image", "label", "sample_id",
    "index"}`` and a ``.samples`` DataFrame. Labels: `per_class` images per class in order, or (None) random
    classes in [0, 1000) drawn after the images from the same generator."""

    def __init__(self, n: int, *, size: int = 224, seed: int = 0, per_class: int | None = None):
        import pandas as pd

        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=generator)
        self.labels = (torch.arange(n) // per_class if per_class else
                       torch.randint(0, 1000, (n,), generator=generator))
        self.samples = pd.DataFrame({"sample_id": [f"img{i}" for i in range(n)], "label": self.labels.tolist()})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "sample_id": f"img{i}", "index": i}


def parse_args(doc: str, *, images: tuple[int, int] | None = None, repeats: int | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The script's flags, its docstring as help: ``--images`` (when `images` = (CPU default, GPU default) is
    given; ``args.images`` is resolved to the default of the device found), ``--repeats`` (when `repeats` is
    given) and whatever `extra` adds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if images is not None:
        parser.add_argument("--images", type=int, default=None,
                            help=f"default {images[0]} on the CPU, {images[1]} on a GPU")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if images is not None and args.images is None:
        args.images = images[1] if torch.cuda.is_available() else images[0]
    return args


def random_vit(device: torch.device, name: str = "vit_base_patch16_224", edit: Callable | None = None):
    """(timm model, :class:`vitlens.HookedViT` over it): `name` with seeded random weights (seed 0), in eval mode
    on `device`; `edit(vit)` runs on the CPU weights first, under no_grad."""
    import timm

    from vitlens import HookedViT

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False).eval()
    if edit is not None:
        with torch.no_grad():
            edit(vit)
    vit = vit.to(device)
    return vit, HookedViT.from_timm(vit)


def set_fused_attn(vit: torch.nn.Module, fused: bool) -> None:
    """Switch timm's fused attention on or off in every block (off: the eager path that hooks can see)."""
    for module in vit.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def print_speedup(header: str, times: dict[str, float], n: int, label: str, goal: float, *, unit: str = "s",
                  note: str = "") -> None:
    """Per-image times of ``times["original"]`` (the original code's structure) and ``times["batched"]``
    (vitlens) over `n` images, then their throughput ratio against `goal`."""
    scale = {"s": 1.0, "ms": 1000.0}[unit]
    print(f"{header}: per image original {scale * times['original'] / n:.2f} {unit}, "
          f"batched {scale * times['batched'] / n:.2f} {unit}{note}")
    print_ratio(label, times["original"] / times["batched"], goal)
