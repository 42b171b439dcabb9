"""Linear probes for every layer and token position: vitlens against the original's per-token loop.

    python bench/probes.py [--images 16] [--pairs 2]

vit_base_patch16_224 (random init), random images and labels over 1000 classes, `--images` training and as
many test images. vitlens: one forward per image batch captures all 12 layers x 197 positions, then one
batched ridge solve per layer on the device. The original (vit-cls_emb ``prober.py``): for every (layer,
token) it runs every training and test image through the model one at a time, keeps that one token and fits
``sklearn Ridge(alpha=1.0, solver="lsqr")``; it is timed on `--pairs` (layer, token) pairs and scaled to all
12 x 197 pairs. Ratio = original / vitlens (goal >= 20).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.linear_model import Ridge

from common import RandomImages, device_and_dtype, parse_args, print_ratio, random_vit, sync
from analyses import probing


def original_pair(vit, train: RandomImages, test: RandomImages, layer: int, token: int, device) -> None:
    """One (layer, token) probe the original's way: a forward per image, one sklearn Ridge."""
    features = {}
    handle = vit.blocks[layer].register_forward_hook(lambda m, i, out: features.update(x=out))

    def token_features(data):
        rows = []
        for i in range(len(data)):
            with torch.no_grad():
                vit(data.images[i:i + 1].to(device))
            rows.append(features["x"][0, token].float().cpu())
        return torch.stack(rows).numpy()

    try:
        x_train, x_test = token_features(train), token_features(test)
    finally:
        handle.remove()
    targets = -np.ones((len(train), 1000))
    targets[np.arange(len(train)), train.labels.numpy()] = 1
    scores = Ridge(alpha=1.0, solver="lsqr").fit(x_train, targets).predict(x_test)
    np.mean(scores.argmax(1) == test.labels.numpy())


def main() -> None:
    args = parse_args(__doc__, images=(16, 1000), extra=lambda parser: parser.add_argument(
        "--pairs", type=int, default=2, help="(layer, token) pairs of the original timed"))
    device, _, batch = device_and_dtype()
    n = args.images  # training images, and as many test images
    vit, model = random_vit(device)
    train, test = RandomImages(n, seed=1), RandomImages(n, seed=2)

    sync(device)
    start = time.perf_counter()
    table = probing.run(model, train, test, batch_size=batch, device=device)
    sync(device)
    ours = time.perf_counter() - start
    assert len(table) == 12 * 197

    start = time.perf_counter()
    for pair in range(args.pairs):
        original_pair(vit, train, test, layer=pair % 12, token=pair, device=device)
    sync(device)
    per_pair = (time.perf_counter() - start) / args.pairs
    original = per_pair * 12 * 197
    print(f"vit_base_patch16_224 (random init), {n} train + {n} test images, 12 layers x 197 tokens, "
          f"{device.type}: vitlens {ours:.1f} s; original {per_pair:.2f} s per (layer, token) pair x 2364 = "
          f"{original:.0f} s (extrapolated from {args.pairs} pairs)")
    print_ratio("probes, original per-token loop / vitlens one forward + batched solve", original / ours, 20)


if __name__ == "__main__":
    main()
