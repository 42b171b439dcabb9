"""ViT-CX (Xie et al., IJCAI 2023): causal explanations from clustered patch-embedding masks, batched.

The feature maps of one layer (default the last block's ``ln1.hook_normalized``, the original's
``blocks[-1].norm1``) are upsampled to the image, min-max normalised per channel and clustered by
agglomerative clustering (distance 1 - cosine, complete linkage, threshold 0.1, scikit-learn); each cluster's
summed channel is a soft mask M_k. The saliency of pixel p is
``(1/K) sum_k [f_c(x*M_k + e_k*(1-M_k)) - f_c(x + e_k*(1-M_k)) + f_c(x)] * M_k(p) / sum_j M_j(p)`` with f_c
the target's softmax probability and e_k Gaussian noise. Unlike vaynexie/CausalX-ViT (one image, a deepcopy
of the model, a wasted backward, a Python loop per mask), the masked and reference images of every image in
the batch are built on the device and run in chunks of `batch_size`, and the noise comes from a CPU
``torch.Generator`` seeded per image, so results are reproducible, batch-independent and leave the global RNG
alone. Maps are [batch H W] at the image resolution. ``compat=True`` keeps the original's NaN (a pixel no
mask covers, or a constant channel); everything else (sklearn's cluster label order with noise slice k for
cluster k, the noise ``noise * randn(K, C, H, W)`` drawn first after seeding with `seed`) is the same in both modes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering

from analyses.explain import register, resolve_target


def normalise_rows(x: torch.Tensor, compat: bool = False) -> torch.Tensor:
    """Per-row min-max of [rows P] to [0, 1]. compat: no guard, a constant row gives NaN (as the original);
    default: a constant row gives 0."""
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    if compat:
        return (x - low) / (high - low)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def channel_masks(features: torch.Tensor, image_size, compat: bool = False) -> torch.Tensor:
    """Feature maps [D grid_h grid_w] -> per-channel masks [D H*W]: bilinear upsampling (align_corners=False,
    as torchvision's Resize) to `image_size`, then :func:`normalise_rows`."""
    up = F.interpolate(features[None].float(), size=tuple(image_size), mode="bilinear", align_corners=False)[0]
    return normalise_rows(up.flatten(1), compat)


def cosine_distance(masks: torch.Tensor) -> torch.Tensor:
    """[D P] -> [D D]: 1 - cosine similarity of the rows, a similarity of 0 where it is NaN (zero rows)."""
    norms = torch.linalg.vector_norm(masks, dim=1)
    similarity = (masks @ masks.T) / (norms[:, None] * norms[None, :])
    return 1 - similarity.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def cluster_labels(distance: torch.Tensor, threshold: float = 0.1) -> np.ndarray:
    """Agglomerative clustering of a precomputed distance [D D] (complete linkage, merges below `threshold`):
    scikit-learn's labels [D], in its numbering (the noise slices follow it)."""
    clustering = AgglomerativeClustering(n_clusters=None, distance_threshold=threshold, metric="precomputed",
                                         linkage="complete")
    return clustering.fit(distance.detach().cpu().numpy()).labels_


def cluster_masks(masks: torch.Tensor, labels: np.ndarray, compat: bool = False) -> torch.Tensor:
    """Per-channel masks [D P] and cluster labels [D] -> cluster masks [K P]: each cluster's channels summed,
    then :func:`normalise_rows` (every mask then holds an exact 0 and an exact 1)."""
    index = torch.as_tensor(labels, dtype=torch.long, device=masks.device)
    summed = masks.new_zeros(int(index.max()) + 1, masks.shape[1]).index_add_(0, index, masks)
    return normalise_rows(summed, compat)


def masking_noise(n_masks: int, shape, noise: float = 0.1, seed: int | torch.Generator = 0) -> torch.Tensor:
    """[K C H W]: ``noise * randn(K, C, H, W)`` from a CPU generator seeded with `seed`: the numbers the
    original draws right after ``torch.manual_seed(seed)``, without touching the global RNG. `seed` may also
    be a CPU ``torch.Generator``, drawn from (and advanced) as it stands."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"seed must be an int or a CPU torch.Generator, got a generator on {seed.device}; "
                             "use torch.Generator() (the noise is drawn on the CPU, then moved)")
        generator = seed
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        generator = torch.Generator().manual_seed(int(seed))
    else:
        raise ValueError(f"seed must be an int or a CPU torch.Generator, got {seed!r}")
    return noise * torch.randn(n_masks, *shape, generator=generator)


def causal_saliency(masked: torch.Tensor, reference: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor,
                    compat: bool = False) -> torch.Tensor:
    """The causal score of K masks -> [H W].

    Args:
        masked, reference: [K] the target's probability on ``x*M_k + e_k*(1-M_k)`` and on ``x + e_k*(1-M_k)``.
        clean: [] the target's probability on the image.
        masks: [K H W].
        compat: NaN where no mask covers a pixel (``sum_k M_k = 0``; always the case for K = 1), as the
            original; default 0 there.
    """
    k = len(masks)
    weights = (masked - reference + clean).to(masks.dtype)
    coverage = masks.sum(0)
    total = (weights @ masks.flatten(1)).reshape(coverage.shape)
    if compat:
        return total / coverage / k
    return torch.where(coverage > 0, total / coverage.clamp_min(torch.finfo(coverage.dtype).tiny) / k,
                       torch.zeros_like(total))


def _feature_hook(model, layer) -> str:
    if isinstance(layer, str):
        model.hook_dict[layer]  # raises UnknownHookError naming the closest hooks
        return layer
    n = model.cfg.n_layers
    if not -n <= int(layer) < n:
        raise ValueError(f"layer must be a block index in [{-n}, {n}) or a hook name, got {layer!r}")
    return f"blocks.{int(layer) % n}.ln1.hook_normalized"


def vit_cx_masks(model, images: torch.Tensor, *, layer=-1, distance_threshold: float = 0.1, compat: bool = False):
    """One forward: (logits [batch classes], cluster masks: a list of [K_b H W] per image on the images' device).

    The features are the patch tokens of `layer` (a block index, whose ``ln1.hook_normalized`` is read, or a
    hook name [batch pos d_model]) on the model's token grid, prefix tokens dropped.
    """
    hook = _feature_hook(model, layer)
    layout = model.layout_for(images)
    with torch.no_grad():
        logits, cache = model.run_with_cache(images, names_filter=hook)
    features = cache[hook][:, layout.n_prefix:]
    if features.ndim != 3 or features.shape[1] != layout.n_patches:
        raise ValueError(f"{hook} gives {tuple(cache[hook].shape)}; ViT-CX needs [batch pos d_model] token features")
    rows, cols = layout.grid
    grids = features.reshape(len(images), rows, cols, -1).permute(0, 3, 1, 2)
    masks = []
    for grid in grids:
        channels = channel_masks(grid, images.shape[-2:], compat)
        labels = cluster_labels(cosine_distance(channels), distance_threshold)
        masks.append(cluster_masks(channels, labels, compat).reshape(-1, *images.shape[-2:]))
    return logits, masks


def causal_scores(model, images: torch.Tensor, target: torch.Tensor, clean: torch.Tensor, masks, *,
                  noise: float = 0.1, seed: int | torch.Generator = 0, batch_size: int = 64,
                  compat: bool = False) -> torch.Tensor:
    """Saliency [batch H W] of the masks (a list of [K_b H W]): every masked and reference image of the batch
    runs through the model in chunks of `batch_size` images, built on the device chunk by chunk.

    `target` [batch] classes, `clean` [batch] their probabilities on the images; image b's noise is
    :func:`masking_noise` (K_b masks, `seed`), slice k for mask k: with an int seed every image's noise is
    drawn after seeding (batch-independent), with a ``torch.Generator`` the images draw from it in turn.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a masked and a reference image), got {batch_size}")
    counts = [len(m) for m in masks]
    all_masks = torch.cat(masks)  # [sum K, H, W]
    eps = torch.cat([masking_noise(k, images.shape[1:], noise, seed) for k in counts]).to(images.device, images.dtype)
    owner = torch.repeat_interleave(torch.arange(len(images), device=images.device),
                                    torch.tensor(counts, device=images.device))
    masked, reference = [], []
    step = batch_size // 2
    with torch.no_grad():
        for start in range(0, len(all_masks), step):
            rows = slice(start, start + step)
            m, x, fill = all_masks[rows, None], images[owner[rows]], eps[rows] * (1 - all_masks[rows, None])
            probs = model(torch.cat([x * m + fill, x + fill])).softmax(-1)
            picked = probs.gather(1, target[owner[rows]].repeat(2)[:, None])[:, 0]
            masked.append(picked[: len(picked) // 2])
            reference.append(picked[len(picked) // 2:])
    masked, reference = torch.cat(masked).split(counts), torch.cat(reference).split(counts)
    return torch.stack([causal_saliency(masked[b], reference[b], clean[b], masks[b], compat)
                        for b in range(len(images))])


@register("vit_cx", options={"layer": -1, "distance_threshold": 0.1, "noise": 0.1, "seed": 0, "batch_size": 64},
          resolution="pixels", description="ViT-CX: causal scores of clustered patch-embedding masks",
          paper="Xie et al., IJCAI 2023; vaynexie/CausalX-ViT", own_target=True)
def vit_cx(model, images: torch.Tensor, target=None, *, compat: bool = False, layer=-1,
           distance_threshold: float = 0.1, noise: float = 0.1, seed: int | torch.Generator = 0,
           batch_size: int = 64) -> torch.Tensor:
    """ViT-CX maps [batch H W] (unnormalised, as the original returns them).

    Options: `layer` (block index or hook name of the features), `distance_threshold` (clustering),
    `noise` (std of the fill noise, in normalised input space), `seed` (an int: each image's noise comes from
    a CPU generator seeded with it, as the original right after ``torch.manual_seed(seed)``; or a CPU
    ``torch.Generator`` that the images draw from in turn; the global RNG is never used),
    `batch_size` (images per masked forward; the original's ``gpu_batch`` was 50). Forwards per image:
    1 + 2K (the original: 2 + 2K and a backward). compat: NaN kept (see :func:`causal_saliency`,
    :func:`normalise_rows`); the default gives 0 there.
    """
    logits, masks = vit_cx_masks(model, images, layer=layer, distance_threshold=distance_threshold, compat=compat)
    target = resolve_target(target, len(images), logits.shape[-1], images.device, logits)
    clean = logits.float().softmax(-1).gather(1, target[:, None])[:, 0]
    return causal_scores(model, images, target, clean, masks, noise=noise, seed=seed, batch_size=batch_size,
                         compat=compat)
