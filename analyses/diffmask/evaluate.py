"""How much of a DiffMask mask lies on the object, over a dataset with token masks, and the mask figure.

A mask that explains an object's class should put more of its mass on the object's patches than the object's
share of the image: :func:`object_relevance` is the mass fraction, :func:`run` tabulates it next to the area
fraction per sample, and :func:`plot` shows images above their masks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch.utils.data import DataLoader, Dataset

from .model import DiffMask


def object_relevance(masks: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """masks, objects: [batch grid_h grid_w] (objects: 0/1 or object fractions) -> [batch] share of mask mass
    on the object, sum(mask * object) / sum(mask)."""
    masks, objects = masks.flatten(1).float(), objects.flatten(1).float()
    return (masks * objects).sum(1) / masks.sum(1).clamp_min(1e-12)


@torch.no_grad()
def run(diffmask: DiffMask, dataset: Dataset, *, batch_size: int = 32, gate: int = -1,
        aggregated: bool = True) -> pd.DataFrame:
    """One row per item: sample_id, label, area (object share of the token grid), relevance (mask mass on the
    object), mask_mean, ratio = relevance / area, and accuracy: the share of tokens where the mask thresholded
    at 0.5 agrees with the object (token_mask >= 0.5), the mask accuracy of the toy task. Items need a
    "token_mask"."""
    device = next(diffmask.parameters()).device
    rows = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        if "token_mask" not in batch:
            raise ValueError("the dataset has no token masks; use the scenes, ImageNet-S (with a model) or the "
                             "CountingTask")
        masks = diffmask.mask(batch["image"].to(device), gate=gate, aggregated=aggregated).cpu()
        objects = batch["token_mask"].float()
        relevance, area = object_relevance(masks, objects), objects.flatten(1).mean(1)
        accuracy = ((masks > 0.5) == (objects >= 0.5)).flatten(1).float().mean(1)
        for i in range(len(masks)):
            rows.append({"sample_id": batch["sample_id"][i], "label": int(batch["label"][i]),
                         "area": float(area[i]), "relevance": float(relevance[i]),
                         "mask_mean": float(masks[i].mean()),
                         "ratio": float(relevance[i] / area[i]) if area[i] > 0 else float("nan"),
                         "accuracy": float(accuracy[i])})
    return pd.DataFrame(rows)


def plot(images: torch.Tensor, masks: torch.Tensor, *, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
         titles: list[str] | None = None) -> go.Figure:
    """images [batch 3 H W] (normalised with `mean`/`std`) above their masks [batch grid_h grid_w] in [0, 1]."""
    n = len(images)
    fig = make_subplots(rows=2, cols=n, subplot_titles=titles, vertical_spacing=0.04, horizontal_spacing=0.01)
    pixels = images.detach().cpu().float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    pixels = (pixels.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        fig.add_trace(go.Image(z=pixels[i]), row=1, col=i + 1)
        fig.add_trace(go.Heatmap(z=np.flipud(masks[i].detach().cpu().float().numpy()), zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=i == n - 1), row=2, col=i + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    for i in range(n):
        fig.update_yaxes(scaleanchor=f"x{n + i + 1}", row=2, col=i + 1)
    fig.update_layout(height=140 + 2 * 110 * 1, width=110 * n + 120, margin=dict(l=10, r=10, t=40, b=10))
    return fig
