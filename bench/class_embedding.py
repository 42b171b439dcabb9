"""The class-embedding recording (analyses.class_embedding.run) against a plain forward and the study's loop.

    python bench/class_embedding.py [--images 16] [--repeats 2]

vit_base_patch16_224 (random init), every token at every layer, rank + logit + top-5 of the residual, attention
and MLP outputs. fp32 batch 8 on the CPU, batch 256 on a CUDA GPU (projection precision "auto", and float32).
Ratios of throughput (images/s), higher is better:
  * run(...) recording vs a plain eager forward of the same images;                       goal >= 0.8
  * run(...) vs a faithful re-creation of vit-cls_emb's extractor loop: per class, a batch of 5 images with
    eager attention, capture of every block output, attention and MLP output, then for each of them the
    head(norm(.)) projection, argsort rank of the label, top-5 and label logit, saved with torch.save;  goal >= 10
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from common import (RandomImages, device_and_dtype, parse_args, print_ratio, random_vit, set_fused_attn, sync,
                    time_interleaved)
from analyses import class_embedding


def study_loop(vit, images: torch.Tensor, labels: torch.Tensor, device, folder: Path) -> None:
    """vit-cls_emb's extractor (§A4): per class of 5 images, capture then project and save, eager attention."""
    set_fused_attn(vit, False)  # timm >= 0.9 needs it for the study's FX softmax node
    captured = {}
    handles = []
    for b, block in enumerate(vit.blocks):
        for name, module in ((f"hs_{b}", block), (f"hs-attn_{b}", block.attn.proj), (f"hs-mlp_{b}", block.mlp.fc2)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o)))
    try:
        with torch.inference_mode():
            for start in range(0, len(images), 5):
                x, y = images[start:start + 5].to(device), labels[start:start + 5].to(device)
                vit(x)
                for name, hidden in captured.items():
                    projection = vit.head(vit.norm(hidden))  # [5 tokens classes]
                    order = projection.argsort(dim=-1, descending=True)
                    pos = (order == y[:, None, None]).nonzero()[:, -1].reshape(order.shape[:2])
                    top5 = order[..., :5]
                    probs = projection.gather(-1, y[:, None, None].expand(-1, projection.shape[1], 1)).squeeze(-1)
                    cls_dir = folder / f"class{start // 5}"
                    cls_dir.mkdir(parents=True, exist_ok=True)
                    for kind, value in (("pos", pos), ("topk", top5), ("probs", probs)):
                        torch.save(value.cpu(), cls_dir / f"{kind}_{name}.pt")
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
        set_fused_attn(vit, True)


def main() -> None:
    args = parse_args(__doc__, images=(16, 1280), repeats=2)
    device, _, batch = device_and_dtype()
    n = args.images
    _, model = random_vit(device)
    data = RandomImages(n, per_class=5)  # 5 per class, as the study
    images, labels = data.images.to(device), data.labels
    root = Path(tempfile.mkdtemp(prefix="vitlens-bench-ce-"))
    counter = iter(range(10 ** 6))

    def plain():
        with torch.inference_mode():
            for start in range(0, n, batch):
                model.vit(images[start:start + batch])

    def recording(precision):
        def call():
            path = root / f"run{next(counter)}"
            class_embedding.run(model, data, path, batch_size=batch, device=device, precision=precision,
                                progress=False).close()
            shutil.rmtree(path)
        return call

    def study():
        folder = root / f"study{next(counter)}"
        study_loop(model.vit, images, labels, device, folder)
        shutil.rmtree(folder)

    resolved = class_embedding.resolve_precision("auto", device)
    print(f"vit_base_patch16_224 (random init), {n} images, batch {batch}, {device}; precision auto = {resolved}")
    try:
        times = time_interleaved({"plain": plain, "auto": recording("auto"), "float32": recording("float32"),
                                  "study": study}, device, repeats=args.repeats, warmup=0 if device.type == "cpu" else 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sync(device)
    for name, seconds in times.items():
        print(f"  {name:<10s} {n / seconds:8.2f} images/s")
    print_ratio(f"run (precision auto={resolved}) / plain eager forward", times["plain"] / times["auto"], 0.8)
    print_ratio("run (float32) / plain eager forward", times["plain"] / times["float32"], 0.8)
    print_ratio(f"run (auto={resolved}) / the study's capture-then-project loop (batch 5)",
                times["study"] / times["auto"], 10)


if __name__ == "__main__":
    main()
