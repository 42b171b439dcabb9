"""Deletion + insertion curves against plain forwards and against Quantus's PixelFlipping, measured in one run.

    python bench/faithfulness.py [--images N] [--repeats 1]

vit_base_patch16_224 (random init), 20 steps, patch level. Deletion and insertion share their end points, so
one image costs 40 forwards; the reference is 40 plain forwards of the same images in batches of the same size
(goal >= 0.8: building the perturbed images costs little). Then a pixel-level deletion curve (16 steps) against
Quantus 0.6 ``PixelFlipping`` on the same maps at the same pixel-aligned points (Quantus flips channel values,
so it needs 48 steps to reach them, one Python forward per step and batch). CPU (fp32, 1 thread) here; CUDA with
bf16 autocast when a GPU is present.
"""
from __future__ import annotations

import torch

from analyses import faithfulness
from common import device_and_dtype, parse_args, print_ratio, time_interleaved
from vitlens import load_model


def main() -> None:
    args = parse_args(__doc__, images=(2, 64), repeats=1,
                      extra=lambda parser: parser.add_argument("--no-quantus", action="store_true"))
    device, dtype, batch = device_and_dtype()
    n = args.images
    torch.manual_seed(0)
    model = load_model("vit_base_patch16_224", pretrained=False).to(device).eval()
    images = torch.randn(n, 3, 224, 224, device=device)
    maps = torch.rand(n, 14, 14, device=device)
    target = torch.zeros(n, dtype=torch.long, device=device)
    chunk = batch if device.type == "cuda" else 16
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def curves():
        with torch.autocast(**amp):
            faithfulness.deletion_insertion(model, images, maps, target, steps=20, batch_size=chunk)

    stacked = images.repeat(40, 1, 1, 1)

    def plain():
        with torch.inference_mode(), torch.autocast(**amp):
            for start in range(0, len(stacked), chunk):
                model(stacked[start:start + chunk])

    times = time_interleaved({"curves": curves, "plain": plain}, device, repeats=args.repeats, warmup=0)
    print(f"vit_base_patch16_224, {n} images, {device.type}, {dtype}, batch {chunk}: deletion+insertion "
          f"{n / times['curves']:.2f} img/s, 40 plain forwards {n / times['plain']:.2f} img/s")
    print_ratio("deletion+insertion (20 steps) / 40 plain forwards", times["plain"] / times["curves"], 0.8)

    if args.no_quantus:
        return
    import quantus

    pixel_maps = torch.rand(n, 224, 224, generator=torch.Generator().manual_seed(1))
    metric = quantus.PixelFlipping(features_in_step=224 * 224 // 16, perturb_baseline=0.0, normalise=False,
                                   disable_warnings=True)

    def ours():
        with torch.autocast(**amp):
            faithfulness.deletion(model, images, pixel_maps.to(device), target, steps=16, level="pixel",
                                  batch_size=chunk)

    def theirs():
        with torch.autocast(**amp):
            metric(model=model, x_batch=images.cpu().numpy(), y_batch=target.cpu().numpy(),
                   a_batch=pixel_maps[:, None].numpy(), device=str(device), softmax=True, batch_size=chunk)

    times = time_interleaved({"ours": ours, "quantus": theirs}, device, repeats=args.repeats, warmup=0)
    print(f"pixel deletion, 16 pixel-aligned points: vitlens {n / times['ours']:.2f} img/s, "
          f"Quantus PixelFlipping {n / times['quantus']:.2f} img/s")
    print_ratio("vitlens deletion / Quantus PixelFlipping (same maps and points)", times["quantus"] / times["ours"], 1.0)


if __name__ == "__main__":
    main()
