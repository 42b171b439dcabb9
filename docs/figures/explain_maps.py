"""Render docs/figures/explain_maps.png: every explanation method's maps for a few bundled scenes.

    python docs/figures/explain_maps.py

The maps of methods that need files (DiffMask's gates) are left out. Each map is min-max scaled for display and
drawn over its image, with the object's outline from the scene's mask.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import analyses  # noqa: E402
from analyses.explain import _scaled, methods, upsample  # noqa: E402
from vitlens import load_model  # noqa: E402
from vitlens.data import load_dataset  # noqa: E402

model = load_model("tiny-scenes")
data = load_dataset("scenes", model=model, mask_resize="area")
items = [data[i] for i in (0, 130, 270, 420)]
images = torch.stack([item["image"] for item in items])
labels = torch.tensor([item["label"] for item in items])
names = [name for name in methods() if name != "diffmask"]  # DiffMask needs a gates file
maps = {name: _scaled(upsample(analyses.explain(model, images, name, labels), images.shape[-2:])) for name in names}
shown = _scaled(images).permute(0, 2, 3, 1)
outline = upsample(torch.stack([item["token_mask"] for item in items]).float(), images.shape[-2:], "nearest")

fig, axes = plt.subplots(len(items), 1 + len(maps), figsize=(1.6 * (1 + len(maps)), 1.6 * len(items)))
for row in range(len(items)):
    for col, name in enumerate(["image", *maps]):
        ax = axes[row, col]
        ax.imshow(shown[row])
        if name != "image":
            ax.imshow(maps[name][row], cmap="jet", alpha=0.55, vmin=0, vmax=1)
        ax.contour(outline[row], levels=[0.5], colors="white", linewidths=0.8)
        ax.set_xticks([]), ax.set_yticks([])
        if row == 0:
            ax.set_title(name, fontsize=8)
fig.tight_layout()
fig.savefig(Path(__file__).with_suffix(".png"), dpi=110)
