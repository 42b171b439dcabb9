"""The class-embedding recording (analyses.class_embedding.run) against a plain forward and the study's loop.

    python bench/class_embedding.py [--images 16] [--repeats 2]

vit_base_patch16_224 (random init), every token at every layer, rank + logit + top-5 of the residual, attention
and MLP outputs. fp32 batch 8 on the CPU, batch 256 on a CUDA GPU (projection precision "auto", and float32).
Ratios of throughput (images/s), higher is better:
  * run(...) recording vs a plain eager forward of the same images;                       goal >= 0.8
  * run(...) vs a faithful re-creation of vit-cls_emb's ``ViTExtractor.extract_hidden_states`` (§A4-A5,
    §A12.11), run as the study runs it for random weights (``pretrained=False``):              goal >= 10
      - a torchvision FX ``create_feature_extractor`` over the timm model traced with fused attention off,
        capturing every node the study captures in every block (hs = ``add_1``, key/value =
        ``attn.getitem_4/5``, attn-w = ``attn.softmax``, hs-attn = ``attn.proj``, key-mlp = ``mlp.fc1``,
        hs-mlp = ``mlp.fc2``) and cls-out = ``head``; built once, outside the timing;
      - one class (5 images) per batch, under no_grad;
      - for every hs* tensor (3 kinds x 12 blocks): head(norm(h)) of all tokens, ``topk(5)``, a full
        descending ``argsort`` with the label's index in it (``pos``), the label's logit (``probs``), each
        written with torch.save into the class's folder (a temporary folder, removed after each repeat);
        ``acc.pt`` (top-1 of cls-out) saved at the end;
      - the key coefficients (key, value, attn-w, key-mlp) are captured but not saved: the study saves them
        only for pretrained weights, and this bench uses random init. Saving them (about 37 MB per class
        for ViT-B/16, mostly attn-w) would make the baseline slower, so leaving them out favours the study.
    Not timed on either side: reading and preprocessing the images (both get the same tensors).
Also printed: the FLOP ceiling (projection FLOPs / forward FLOPs; at an equal FLOP rate the recording cannot
exceed 1 / (1 + that) of the forward: 0.76 for ViT-B/16 in float32, higher where bfloat16 runs natively),
and the ceiling of the second ratio, the study's loop / the plain forward: the recording is never faster than
the forward, so on a CPU, where the study's loop costs about 3 forwards, the 10x goal is out of reach; on a
GPU the study's batches of 5 leave the device mostly idle and the goal is reachable.
Timings from a shared machine are noisy: the calls are interleaved and the fastest repeat is kept.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from common import (RandomImages, device_and_dtype, parse_args, print_ratio, random_vit, set_fused_attn, sync,
                    time_interleaved)
from analyses import class_embedding


def study_extractor(vit):
    """vit-cls_emb's feature extractor (§A4): a torchvision FX graph of `vit` (traced with eager attention, as
    timm >= 0.9 needs for the ``attn.softmax`` node) returning, for every block b, every node the study
    captures: ``hs_b`` (``add_1``), ``key_b``/``value_b`` (``attn.getitem_4/5``), ``attn-w_b``
    (``attn.softmax``), ``hs-attn_b`` (``attn.proj``), ``key-mlp_b`` (``mlp.fc1``), ``hs-mlp_b``
    (``mlp.fc2``), and ``cls-out`` (``head``)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = {"head": "cls-out"}
    for b in range(len(vit.blocks)):
        nodes.update({f"blocks.{b}.add_1": f"hs_{b}", f"blocks.{b}.attn.getitem_4": f"key_{b}",
                      f"blocks.{b}.attn.getitem_5": f"value_{b}", f"blocks.{b}.attn.softmax": f"attn-w_{b}",
                      f"blocks.{b}.attn.proj": f"hs-attn_{b}", f"blocks.{b}.mlp.fc1": f"key-mlp_{b}",
                      f"blocks.{b}.mlp.fc2": f"hs-mlp_{b}"})
    set_fused_attn(vit, False)
    try:
        return create_feature_extractor(vit, nodes).eval()
    finally:
        set_fused_attn(vit, True)


def study_loop(extractor, vit, images: torch.Tensor, labels: torch.Tensor, device, folder: Path) -> None:
    """vit-cls_emb's ``ViTExtractor.extract_hidden_states`` with ``pretrained=False`` (§A4): per class, its 5
    images through the extractor under no_grad, then for every ``hs*`` tensor the projection head(norm(h)) of
    all tokens, ``topk(5)``, the label's index in a full descending argsort and the label's logit, each
    saved with torch.save into the class's folder; top-1 correctness of ``cls-out`` collected and saved as
    ``acc.pt`` at the end. The key coefficients (key, value, attn-w, key-mlp) are captured but, as the study
    does for random weights, not saved."""
    accuracy = []
    for start in range(0, len(images), 5):
        x, label = images[start:start + 5].to(device), int(labels[start])
        folder_c = folder / f"class{start // 5}"
        folder_c.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            out = extractor(x)
        for name, hidden in out.items():
            if name == "cls-out":
                accuracy.append((hidden.topk(1)[1] == label).long().squeeze())
            elif "hs" in name:
                with torch.no_grad():
                    projection = vit.head(vit.norm(hidden))  # [5 tokens classes]
                torch.save(projection.topk(5, dim=-1)[1], folder_c / f"topk_{name}.pt")
                order = torch.argsort(projection, dim=2, descending=True)
                pos = (order == label).nonzero()[:, 2].reshape(len(x), projection.shape[1])
                torch.save(pos, folder_c / f"pos_{name}.pt")
                torch.save(projection[:, :, label].clone(), folder_c / f"probs_{name}.pt")
    torch.save(torch.hstack(accuracy), folder / "acc.pt")


def flop_ceiling(model) -> tuple[float, float]:
    """(forward FLOPs, projection FLOPs) per image: the forward counted by torch's FlopCounterMode, the
    projection as 2 x kinds x layers x tokens x d_model x classes (the head's matmul; norms and top-5 not
    counted). ``1 / (1 + projection / forward)`` bounds the recording/forward ratio when both run at the
    same FLOP rate (float32); a faster bfloat16 matmul (AMX, tensor cores) lifts that bound."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(1, 3, *model.image_size, device=model.W_U.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.vit(image)
    cfg = model.cfg
    projection = 2 * len(class_embedding.SOURCES) * cfg.n_layers * model.layout.n_tokens * cfg.d_model * cfg.d_vocab
    return counter.get_total_flops(), projection


def main() -> None:
    args = parse_args(__doc__, images=(16, 1280), repeats=2)
    device, _, batch = device_and_dtype()
    n = args.images
    _, model = random_vit(device)
    data = RandomImages(n, per_class=5)  # 5 per class, as the study
    images, labels = data.images.to(device), data.labels
    root = Path(tempfile.mkdtemp(prefix="vitlens-bench-ce-"))
    counter = iter(range(10 ** 6))

    def plain():
        with torch.inference_mode():
            for start in range(0, n, batch):
                model.vit(images[start:start + batch])

    def recording(precision):
        def call():
            path = root / f"run{next(counter)}"
            class_embedding.run(model, data, path, batch_size=batch, device=device, precision=precision,
                                progress=False).close()
            shutil.rmtree(path)
        return call

    extractor = study_extractor(model.vit)  # built once, as the study's __init__ does

    def study():
        folder = root / f"study{next(counter)}"
        study_loop(extractor, model.vit, images, labels, device, folder)
        shutil.rmtree(folder)

    resolved = class_embedding.resolve_precision("auto", device)
    print(f"vit_base_patch16_224 (random init), {n} images, batch {batch}, {device}; precision auto = {resolved}")
    forward_flops, projection_flops = flop_ceiling(model)
    print(f"  FLOPs per image: forward {forward_flops / 1e9:.1f} G, "
          f"projection of 3 kinds {projection_flops / 1e9:.1f} G "
          f"({projection_flops / forward_flops:.0%}); ceiling at equal FLOP rate "
          f"{1 / (1 + projection_flops / forward_flops):.2f} of the forward")
    try:
        times = time_interleaved({"plain": plain, "auto": recording("auto"), "float32": recording("float32"),
                                  "study": study}, device, repeats=args.repeats,
                                 warmup=0 if device.type == "cpu" else 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sync(device)
    for name, seconds in times.items():
        print(f"  {name:<10s} {n / seconds:8.2f} images/s")
    print_ratio(f"run (precision auto={resolved}) / plain eager forward", times["plain"] / times["auto"], 0.8)
    print_ratio("run (float32) / plain eager forward", times["plain"] / times["float32"], 0.8)
    print_ratio(f"run (auto={resolved}) / the study's capture-then-project loop (batch 5)",
                times["study"] / times["auto"], 10)
    ceiling = times["study"] / times["plain"]
    print(f"  ceiling of that ratio (the study's loop / the plain forward alone): {ceiling:.2f}")


if __name__ == "__main__":
    main()
