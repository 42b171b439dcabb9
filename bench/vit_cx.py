"""Batched ViT-CX against the original's per-image structure, as a ratio measured in one run.

    python bench/vit_cx.py [--images N] [--repeats 1]

vit_base_patch16_224 (random init), fp32; 2 images on the CPU, 16 on a CUDA GPU; the same clustering (so the
same K per image) and the same 2K masked and reference forwards on both sides. The baseline follows
vaynexie/CausalX-ViT's ``ViT_CX`` per image: a deepcopy of the model wrapped with a softmax, a clean forward, a
feature pass with a forward hook and the (unused) backward of the target logit, the masks built in a Python
loop, the noise drawn after ``torch.manual_seed``, forwards in chunks of ``gpu_batch=50``. The batched side is
``analyses.explain(model, images, "vit_cx", compat=True, batch_size=64)``; the maps must agree. Goal on a GPU: >= 5x.
"""
from __future__ import annotations

import copy

import torch

import analyses
from analyses.vit_cx import channel_masks, cluster_labels, cluster_masks, cosine_distance
from common import device_and_dtype, parse_args, print_speedup, random_vit, time_interleaved


def original_style(vit, images: torch.Tensor, seed: int = 0, gpu_batch: int = 50) -> torch.Tensor:
    """ViT-CX one image at a time with the original's control flow (the masks' arithmetic from vitlens)."""
    maps = []
    for image in images:
        image = image[None]
        softmax_model = torch.nn.Sequential(copy.deepcopy(vit), torch.nn.Softmax(dim=1)).eval()
        for p in softmax_model.parameters():
            p.requires_grad = False
        probs = softmax_model(image)
        target = int(probs[0].argmax())
        class_p = probs[0, target].detach()
        saved = []
        handle = vit.blocks[-1].norm1.register_forward_hook(lambda m, a, out: saved.append(out.detach()))
        try:
            vit(image)[0, target].backward(retain_graph=True)  # the original's feature pass and its wasted backward
        finally:
            handle.remove()
            vit.zero_grad(set_to_none=True)
        features = saved[0][0, 1:].reshape(14, 14, -1).permute(2, 0, 1)
        channels = channel_masks(features, image.shape[-2:], compat=True)
        labels = cluster_labels(cosine_distance(channels))
        masks = cluster_masks(channels, labels, compat=True).reshape(-1, *image.shape[-2:])
        k = len(masks)
        torch.manual_seed(seed)
        noise = (0.1 * torch.randn(k, *image.shape[1:])).to(image.device)
        stack = []
        for j in range(k):  # a Python loop per mask, as the original
            stack.append(image[0] * masks[j] + noise[j] * (1 - masks[j]))
        for j in range(k):
            stack.append(image[0] + noise[j] * (1 - masks[j]))
        stack = torch.stack(stack)
        with torch.no_grad():
            p = torch.cat([softmax_model(stack[i:i + gpu_batch]) for i in range(0, len(stack), gpu_batch)])
        p_final = p[:k, target] - p[k:, target] + class_p
        maps.append((p_final @ masks.flatten(1)).reshape(masks.shape[1:]) / masks.sum(0) / k)
    return torch.stack(maps)


def main() -> None:
    args = parse_args(__doc__, images=(2, 16), repeats=1)
    device, _, _ = device_and_dtype()
    n = args.images
    vit, model = random_vit(device)
    images = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    _, masks = analyses.vit_cx.vit_cx_masks(model, images, compat=True)
    state = torch.get_rng_state()
    results = {}

    def run(name, fn):
        def call():
            results[name] = fn()
        return call

    times = time_interleaved({"original": run("original", lambda: original_style(vit, images)),
                              "batched": run("batched", lambda: analyses.explain(model, images, "vit_cx",
                                                                                 compat=True, batch_size=64))},
                             device, repeats=args.repeats, warmup=0)
    torch.set_rng_state(state)
    difference = (results["batched"] - results["original"]).abs().max().item()
    scale = results["original"].abs().max().item()
    print_speedup(f"vit_base_patch16_224 ViT-CX, {n} images, K = {[len(m) for m in masks]}, {device.type}", times, n,
                  "batched ViT-CX / per-image original structure (throughput)", 5.0,
                  note=f"; max |map difference| {difference:.2e} (maps up to {scale:.2e})")


if __name__ == "__main__":
    main()
