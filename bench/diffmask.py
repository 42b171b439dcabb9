"""Vision DiffMask cost against the plain ViT, as throughput ratios measured in one run.

    python bench/diffmask.py [--repeats 3] [--no-base]

For the bundled tiny model and vit_base_patch16_224 (random init): fp32 and batch 8 on the CPU, bf16 autocast
and batch 256 (tiny) / 64 (ViT-B) on a CUDA GPU. Two ratios each (higher is better):
  * training: images/s of one DiffMask batch (the frozen ViT's reading, the gate step's masked forward and
    backward, the alpha step's masked forward) / a plain forward+backward of the same ViT;   goal >= 0.33
  * inference: DiffMask.mask (all gates) / a plain forward;                                    goal >= 0.5
"""
from __future__ import annotations


import timm
import torch
import torch.nn.functional as F

from common import device_and_dtype, parse_args, print_ratio, time_interleaved
from analyses.diffmask import DiffMask, Trainer
from vitlens import HookedViT, load_model


def bench(name: str, model: HookedViT, batch: int, device, dtype, repeats: int) -> None:
    model = model.to(device)
    x = torch.randn(batch, *model.data_config["input_size"], device=device)
    labels = torch.randint(0, model.cfg.d_vocab, (batch,), device=device)
    diffmask = DiffMask(model).to(device)
    trainer = Trainer(diffmask, warmup=0)
    autocast = dtype != torch.float32

    def plain_train():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model.vit(x).float(), labels)
        loss.backward()
        model.vit.zero_grad(set_to_none=True)

    def diffmask_train():  # as train(): the ViT frozen, so no weight gradients are computed for it
        model.vit.requires_grad_(False)
        trainer.step(x, autocast=autocast)
        model.vit.requires_grad_(True)

    def plain_forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            model.vit(x)

    def mask():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            diffmask.mask(x)

    times = time_interleaved({"plain_train": plain_train, "diffmask_train": diffmask_train,
                              "plain_forward": plain_forward, "mask": mask}, device, repeats=repeats)
    print(f"{name}: batch {batch}, {dtype}, {device.type}; "
          + ", ".join(f"{k} {batch / v:.1f} img/s" for k, v in times.items()))
    print_ratio("DiffMask training batch / plain forward+backward", times["plain_train"] / times["diffmask_train"], 0.33)
    print_ratio("DiffMask.mask / plain forward", times["plain_forward"] / times["mask"], 0.5)


def main() -> None:
    args = parse_args(__doc__, repeats=3, extra=lambda parser: parser.add_argument(
        "--no-base", action="store_true", help="only the tiny model"))
    device, dtype, batch = device_and_dtype()
    torch.manual_seed(0)
    bench("tiny-scenes", load_model("tiny-scenes"), batch, device, dtype, args.repeats)
    if not args.no_base:
        vit = timm.create_model("vit_base_patch16_224", pretrained=False)
        bench("vit_base_patch16_224", HookedViT.from_timm(vit), batch if device.type == "cpu" else 64, device, dtype,
              args.repeats)


if __name__ == "__main__":
    main()
