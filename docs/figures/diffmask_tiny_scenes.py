"""Render docs/figures/diffmask_tiny_scenes.png: Vision DiffMask masks of a short training on tiny-scenes.

    python docs/figures/diffmask_tiny_scenes.py

The same run as ``vitlens train-diffmask --model tiny-scenes --data scenes --out cache/diffmask-figure
--max-steps 150 --batch-size 16 --lr 1e-2 --lr-placeholder 1e-2 --warmup 10`` (resumes from that directory),
then :func:`analyses.diffmask.run` over the scenes: the title gives the mean mask mass on the object against
the object's area. Rows: the image, its DiffMask mask (P(product of all gates != 0)), the object's area per patch.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from analyses.diffmask import DiffMask, run, train  # noqa: E402
from analyses.explain import _scaled  # noqa: E402
from vitlens import load_model  # noqa: E402
from vitlens.data import load_dataset  # noqa: E402

torch.set_num_threads(1)
model = load_model("tiny-scenes")
data = load_dataset("scenes", model=model, mask_resize="area")
torch.manual_seed(123)  # as the command line: --seed 123 initialises the gates
diffmask = DiffMask(model)
train(diffmask, data, "cache/diffmask-figure", epochs=5, max_steps=150, batch_size=16, lr=1e-2, lr_placeholder=1e-2,
      warmup=10, progress=False)
table = run(diffmask, data)
title = (f"Vision DiffMask on tiny-scenes, 150 batches of 16: mask mass on the object {table.relevance.mean():.2f} "
         f"vs object area {table.area.mean():.2f}, mask mean {table.mask_mean.mean():.2f}")
print(title)
items = [data[i] for i in range(0, len(data), len(data) // 8)][:8]
images = torch.stack([item["image"] for item in items])
masks = diffmask.mask(images)
out = Path(__file__).with_suffix("")
fig, axes = plt.subplots(3, len(items), figsize=(1.45 * len(items), 4.6))
for col, item in enumerate(items):
    for row, (picture, name) in enumerate(((_scaled(images).permute(0, 2, 3, 1)[col], "image"),
                                           (masks[col], "DiffMask mask"), (item["token_mask"], "object (area)"))):
        ax = axes[row, col]
        ax.imshow(picture, **({} if row == 0 else {"cmap": "viridis" if row == 1 else "gray", "vmin": 0, "vmax": 1}))
        ax.set_xticks([]), ax.set_yticks([])
        if col == 0:
            ax.set_title(name, fontsize=8, loc="left")
fig.suptitle(title, fontsize=8)
fig.tight_layout()
fig.savefig(f"{out}.png", dpi=110)
