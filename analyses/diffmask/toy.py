"""The toy counting task of Vision DiffMask: grids of coloured patches, the label is the number of red ones.

Each cell of a grid_h x grid_w grid is one solid colour out of the six with (r, g, b) in {0, 1}^3 minus black and
white (colour index ``int('rgb', 2) - 1``, so red is 3); the number of red cells is drawn uniformly from
0..grid_h*grid_w (the original's ``FairGridSampler``) and the label is that count. A ViT whose patch is one cell
can only answer by looking at the red cells, so a faithful mask selects exactly those: each item's
``token_mask`` [grid_h grid_w] marks them, a known answer for mask faithfulness. :func:`toy_vit` builds a small
timm ViT for the task and :func:`fit` trains any classifier on it.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset

from vitlens import HookedViT

COLOURS = torch.tensor([c for c in itertools.product((0.0, 1.0), repeat=3) if len(set(c)) > 1])  # [6 3]
RED = 3


class CountingTask(Dataset):
    """`n` grids in the vitlens item format: {"image": [3 H W], "label": count, "sample_id", "index",
    "token_mask": [grid_h grid_w] (1 on red cells)}.

    Args:
        n: number of items. grid: cells per side (int) or (rows, cols). patch: pixels per cell.
        model: take `grid`, `patch` and the normalisation from this HookedViT (one cell per token).
        mean, std: normalisation (the original's 0.5 and 0.5 map colours to -1 and 1).
    """

    def __init__(self, n: int = 1000, grid: int | tuple[int, int] = 3, patch: int = 16, *,
                 model: HookedViT | None = None, seed: int = 0, mean: float = 0.5, std: float = 0.5):
        if model is not None:
            grid, patch = model.layout.grid, model.vit.patch_embed.patch_size[0]
            mean, std = torch.tensor(model.data_config["mean"]), torch.tensor(model.data_config["std"])
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if min(self.grid) < 1 or patch < 1:
            raise ValueError(f"grid and patch must be positive, got grid {grid} and patch {patch}")
        self.patch = patch
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        cells = self.grid[0] * self.grid[1]
        generator = torch.Generator().manual_seed(seed)
        counts = torch.randint(0, cells + 1, (n,), generator=generator)
        others = torch.tensor([c for c in range(len(COLOURS)) if c != RED])
        colours = others[torch.randint(0, len(others), (n, cells), generator=generator)]
        order = torch.rand(n, cells, generator=generator).argsort(1)
        colours[order < counts[:, None]] = RED  # `count` random cells of each grid turn red
        self.colours = colours
        self.samples = pd.DataFrame({"sample_id": [f"toy{i:05d}" for i in range(n)], "label": counts.tolist()})
        self.classes = [str(c) for c in range(cells + 1)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        cells = COLOURS[self.colours[index]].T.reshape(3, *self.grid)  # [3 grid_h grid_w]
        image = cells.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2)
        return {"image": (image - self.mean) / self.std, "label": int(self.samples.label[index]),
                "sample_id": self.samples.sample_id[index], "index": index,
                "token_mask": (self.colours[index] == RED).float().reshape(self.grid)}


def toy_vit(grid: int = 3, patch: int = 8, *, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
            seed: int = 0) -> HookedViT:
    """A small randomly initialised CLS-pooling ViT with one token per cell and grid²+1 count classes; its data
    config is the task's (mean and std 0.5), so ``CountingTask(model=...)`` makes its inputs."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=grid * patch, patch_size=patch, num_classes=grid * grid + 1,
                            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=2)
    vit.pretrained_cfg = {"input_size": (3, grid * patch, grid * patch), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                          "crop_pct": 1.0, "interpolation": "nearest"}
    return HookedViT.from_timm(vit, tag=f"toy-count-{grid}x{grid}")


def fit(model: HookedViT, dataset: Dataset, *, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3,
        seed: int = 0) -> float:
    """Train `model` to predict the labels of `dataset` (AdamW, cross-entropy); returns the last epoch's accuracy."""
    optimizer = create_optimizer_v2(model.vit, "adamw", lr=lr, weight_decay=0.05)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        correct = 0
        for batch in loader:
            logits = model.vit(batch["image"])
            loss = F.cross_entropy(logits, batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(-1) == batch["label"]).sum())
    model.eval()
    return correct / len(dataset)


TOY_WEIGHTS = Path(__file__).with_name("toy_count_3x3.safetensors")
TOY_MODEL = "toy-count-3x3"  # the shipped counting ViT's name for `vitlens train-diffmask --model`
TOY_RECIPE = {"grid": 3, "patch": 4, "n": 1000, "epochs": 10, "batch_size": 32, "lr": 3e-3, "seed": 0}


def pretrained_toy_vit() -> HookedViT:
    """The shipped counting ViT (3x3 grid of 4 px cells, 2 blocks, width 32; 100% on held-out grids), trained
    by ``python -m analyses.diffmask.toy`` with :data:`TOY_RECIPE`."""
    model = toy_vit(TOY_RECIPE["grid"], TOY_RECIPE["patch"])
    model.vit.load_state_dict(load_file(str(TOY_WEIGHTS)))
    return model


def main(argv: list[str] | None = None) -> None:
    """Retrain the shipped counting ViT and print its held-out accuracy."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=TOY_WEIGHTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = TOY_RECIPE
    model = toy_vit(r["grid"], r["patch"], seed=r["seed"])
    fit(model, CountingTask(r["n"], r["grid"], r["patch"], seed=r["seed"]), epochs=r["epochs"],
        batch_size=r["batch_size"], lr=r["lr"], seed=r["seed"])
    held_out = CountingTask(500, r["grid"], r["patch"], seed=r["seed"] + 1)
    batch = next(iter(DataLoader(held_out, batch_size=len(held_out))))
    with torch.no_grad():
        accuracy = (model(batch["image"]).argmax(-1) == batch["label"]).float().mean().item()
    save_file({k: v.contiguous() for k, v in model.vit.state_dict().items()}, str(args.out))
    print(f"held-out accuracy {accuracy:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
