"""Batched attention rollout against a per-image loop in vit-explain's style, as a ratio measured in one run.

    python bench/rollout.py [--repeats 3] [--batch N]

vit_base_patch16_224 (random init, q/k scaled x4 so that the attention has no topk ties), fp32; batch 16 on
the CPU, 64 on a CUDA GPU. The baseline is vit-explain's ``VITAttentionRollout`` structure: timm with fused
attention off, a forward hook on every ``attn_drop`` copying the pattern to the CPU, one image per call, then
the global topk discard, the scatter and the product on the CPU. The batched side is
``analyses.explain(model, images, "rollout", compat=True, head_fusion="max", discard_ratio=0.9)``, which must
give the same maps. Goal on a GPU: >= 20x.
"""
from __future__ import annotations

import copy

import torch

import analyses
from common import device_and_dtype, parse_args, print_speedup, random_vit, set_fused_attn, time_interleaved


def original_style(vit, images: torch.Tensor, ratio: float = 0.9) -> torch.Tensor:
    """One image at a time, as vit-explain: hooks on attn_drop, CPU rollout with max fusion."""
    saved: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda module, args, out: saved.append(out.cpu()))
               for name, m in vit.named_modules() if name.endswith("attn_drop")]
    maps = []
    try:
        for image in images:
            saved.clear()
            with torch.no_grad():
                vit(image[None])
                result = torch.eye(saved[0].size(-1))
                for attention in saved:
                    fused = attention.max(dim=1).values
                    flat = fused.view(fused.size(0), -1)
                    _, indices = flat.topk(int(flat.size(-1) * ratio), -1, False)
                    indices = indices[indices != 0]
                    flat[0, indices] = 0
                    a = (fused + torch.eye(fused.size(-1))) / 2
                    a = a / a.sum(dim=-1)
                    result = a @ result
            mask = result[0, 0, 1:]
            side = int(mask.size(-1) ** 0.5)
            mask = mask.reshape(side, side)
            maps.append(mask / mask.max())
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(maps)


def sharpen(vit) -> None:
    """Scale the query and key weights by 4, so that random attention is peaked enough for rollout to be tested."""
    for block in vit.blocks:
        block.attn.qkv.weight[: 2 * vit.embed_dim] *= 4


def main() -> None:
    args = parse_args(__doc__, images=(16, 64), repeats=3)
    device, _, _ = device_and_dtype()
    batch = args.images
    vit, model = random_vit(device, edit=sharpen)
    eager = copy.deepcopy(vit)
    set_fused_attn(eager, False)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)

    def batched():
        return analyses.explain(model, images, "rollout", compat=True, head_fusion="max", discard_ratio=0.9)

    difference = (batched().cpu() - original_style(eager, images)).abs().max().item()
    times = time_interleaved({"original": lambda: original_style(eager, images), "batched": batched}, device,
                             repeats=args.repeats, warmup=0)
    print_speedup(f"vit_base_patch16_224 rollout (max, 0.9), batch {batch}, {device.type}", times, batch,
                  "batched rollout / per-image vit-explain loop (throughput)", 20.0, unit="ms",
                  note=f"; max |map difference| {difference:.2e}")


if __name__ == "__main__":
    main()
