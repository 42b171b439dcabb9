"""Train the bundled tiny ViT on the scene set (`vitlens.data.scenes`) and save it in timm's local-dir format.

    python -m vitlens.zoo.train_tiny --out vitlens/zoo/tiny-scenes
    python -m vitlens.zoo.train_tiny --out vitlens/zoo/tiny-scenes-gap --global-pool avg

Recipe: a timm VisionTransformer (48 px, patch 8 -> 6x6 tokens, width 64, depth 4, 4 heads, MLP ratio 2),
AdamW (timm's parameter groups: no weight decay on norms, biases and embeddings), lr 3e-3, batch 64, one epoch
of linear warm-up then cosine decay per step, label smoothing 0.1, +-2 px random shifts, fresh training scenes
every epoch from the 4000 training digits. The first 24 of 40 epochs use backgrounds with no class cue: trained
on the real scenes from the start, the model settles on the easy background cue (75% accuracy) and stalls there;
learning the digits first and the cue afterwards gives a model that uses both. Seeded and run on one CPU thread,
it is deterministic; it takes about 5-6 minutes. The output folder gets `config.json` +
`model.safetensors` (`timm.models.save_for_hf`; load with `timm.create_model('local-dir:' + folder,
pretrained=True)`) and `training.json` (arguments, per-epoch history, wall time, validation accuracy).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader

from vitlens.data import load_dataset, train_scenes
from vitlens.data.scenes import CONTEXT_AGREEMENT, CLASS_NAMES, DATA_CONFIG, IMAGE_SIZE, LEMMAS, N_TRAIN_DIGITS, PATCH_SIZE

BASE_ARCHITECTURE = "vit_tiny_patch16_224"  # only names the timm entry point; the model args set every size


def model_args(global_pool: str = "token") -> dict:
    """timm VisionTransformer arguments of the tiny scene model (CLS pooling, or average pooling with fc_norm)."""
    return dict(img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, in_chans=3, num_classes=len(CLASS_NAMES), embed_dim=64,
                depth=4, num_heads=4, mlp_ratio=2.0, global_pool=global_pool)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the model's input normalisation (DATA_CONFIG mean/std)."""
    mean = torch.tensor(DATA_CONFIG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(DATA_CONFIG["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to +-max_shift px in each direction, repeating the border pixels."""
    if max_shift == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, [max_shift] * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([image[:, dy:dy + height, dx:dx + width] for image, (dy, dx) in zip(padded, offsets)])


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy on preprocessed images (N, 3, H, W)."""
    model.eval()
    predictions = torch.cat([model(chunk).argmax(-1) for chunk in images.split(250)])
    return (predictions == labels).float().mean().item()


def train(out: Path, *, global_pool: str = "token", epochs: int = 40, cue_free_epochs: int = 24, seed: int = 0,
          batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.05, warmup_epochs: int = 1,
          label_smoothing: float = 0.1, max_shift: int = 2, scenes_root: Path | None = None) -> dict:
    """Train, save to `out`, and return the training record (also written to `out/training.json`)."""
    arguments = {k: v for k, v in locals().items() if k not in ("out", "scenes_root")}
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    validation = load_dataset("scenes", root=scenes_root, data_config=DATA_CONFIG)
    batch = next(iter(DataLoader(validation, batch_size=len(validation))))
    val_images, val_labels = batch["image"], batch["label"]

    args = model_args(global_pool)
    model = timm.create_model(BASE_ARCHITECTURE, pretrained=False, **args)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(N_TRAIN_DIGITS / batch_size)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=lr * 0.01,
                                  warmup_t=warmup_epochs * steps_per_epoch, warmup_lr_init=lr * 0.01,
                                  t_in_epochs=False)
    generator = torch.Generator().manual_seed(seed)
    history, start, step = [], time.perf_counter(), 0
    for epoch in range(epochs):
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        agreement = 0.1 if epoch < cue_free_epochs else CONTEXT_AGREEMENT
        for images, labels in train_scenes(epoch, seed=seed, batch_size=batch_size, context_agreement=agreement):
            logits = model(normalize(random_shift(images, max_shift, generator)))
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / seen, "train_acc": correct / seen,
                        "val_acc": evaluate(model, val_images, val_labels),
                        "elapsed_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(history[-1]), flush=True)
    wall_time = time.perf_counter() - start

    timm.models.save_for_hf(model, out, model_args=args, safe_serialization=True, data_config=DATA_CONFIG,
                            model_config={"label_names": list(CLASS_NAMES),
                                          "label_descriptions": dict(zip(CLASS_NAMES, LEMMAS)),
                                          "pretrained_cfg": {"tag": "vitlens_scenes", "license": "mit"}})
    record = {"arguments": arguments, "scenes": validation.root.name, "architecture": BASE_ARCHITECTURE,
              "model_args": args,
              "parameters": sum(p.numel() for p in model.parameters()), "data_config": DATA_CONFIG,
              "val_acc": history[-1]["val_acc"], "val_images": len(val_labels), "wall_time_s": round(wall_time, 1),
              "history": history,
              "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}}
    (Path(out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (config.json, model.safetensors)")
    parser.add_argument("--global-pool", default="token", choices=["token", "avg"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cue-free-epochs", type=int, default=24,
                        help="first epochs on backgrounds that carry no class cue")
    parser.add_argument("--scenes-root", type=Path, default=None, help="cache folder of the validation scenes")
    options = parser.parse_args(argv)
    record = train(options.out, global_pool=options.global_pool, epochs=options.epochs, seed=options.seed,
                   batch_size=options.batch_size, lr=options.lr, cue_free_epochs=options.cue_free_epochs,
                   scenes_root=options.scenes_root)
    print(f"val_acc {record['val_acc']:.4f}  wall time {record['wall_time_s']} s  -> {options.out}")


if __name__ == "__main__":
    main()
