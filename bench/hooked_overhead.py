"""HookedViT overhead against timm, as throughput ratios measured in one run.

    python bench/hooked_overhead.py [--repeats 5]

For the bundled tiny model and vit_base_patch16_224 (random init): fp32 and batch 8 on the CPU, bf16 and
batch 256 on a CUDA GPU. Two ratios each (higher is better, 1.0 = no overhead):
  * HookedViT with no hooks vs timm (fused attention);                         goal >= 0.97
  * HookedViT with hook_pattern on every layer vs timm with fused_attn=False;    goal >= 0.95
"""
from __future__ import annotations

import copy

import timm
import torch

from common import device_and_dtype, parse_args, print_ratio, set_fused_attn, time_interleaved
from vitlens import HookedViT, load_model


def bench(name: str, model: HookedViT, batch: int, device, dtype, repeats: int) -> None:
    model = model.to(device)
    vit = model.vit
    x = torch.randn(batch, *model.data_config["input_size"], device=device)
    # A second wrapper of the same timm model keeps the pattern hooks attached for the whole timing
    # (run_with_hooks would add ~0.1 ms of hook set-up per call, which only tiny models notice).
    patterned = HookedViT.from_timm(vit)
    patterned.add_hook(lambda name: name.endswith("attn.hook_pattern"), lambda pattern, hook: None)

    def run(fn):
        def call():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                fn(x)
        return call

    timm_eager = copy.deepcopy(vit)
    set_fused_attn(timm_eager, False)

    times = time_interleaved({"timm": run(vit), "hooked": run(model), "timm_eager": run(timm_eager),
                              "hooked_pattern": run(patterned)}, device, repeats=repeats)
    print(f"{name}: batch {batch}, {dtype}, {device.type}; "
          + ", ".join(f"{k} {batch / v:.1f} img/s" for k, v in times.items()))
    print_ratio("HookedViT (no hooks) / timm fused", times["timm"] / times["hooked"], 0.97)
    print_ratio("HookedViT (hook_pattern everywhere) / timm fused_attn=False",
                times["timm_eager"] / times["hooked_pattern"], 0.95)


def main() -> None:
    args = parse_args(__doc__, repeats=5)
    device, dtype, batch = device_and_dtype()
    torch.manual_seed(0)
    bench("tiny-scenes", load_model("tiny-scenes"), batch, device, dtype, args.repeats * 100)
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False)
    bench("vit_base_patch16_224", HookedViT.from_timm(vit_b), batch, device, dtype, args.repeats)


if __name__ == "__main__":
    main()
