"""Vision DiffMask (Nalmpantis et al., CVPRW 2023) on any supported timm ViT, through HookedViT hooks.

- :mod:`.gates`: the gate MLP and the hard-concrete gate;
- :mod:`.model`: :class:`DiffMask` (masked forward, ``mask``, checkpoints) and the ``"diffmask"`` method of
  :func:`analyses.explain.methods`;
- :mod:`.train`: the plain PyTorch training loop (Lookahead-Adam, Lagrange multipliers, resume) and
  ``vitlens train-diffmask``;
- :mod:`.original`: the original's checkpoints and the HF -> timm key map;
- :mod:`.toy`: the counting task with known masks;
- :mod:`.evaluate`: mask relevance on the object over a dataset, and the mask figure.
"""
from .evaluate import object_relevance, plot, run
from .model import DiffMask, DiffMaskOutput
from .original import hf_vit_to_timm, read_original
from .toy import CountingTask, fit, pretrained_toy_vit, toy_vit
from .train import Trainer, train

__all__ = ["CountingTask", "DiffMask", "DiffMaskOutput", "Trainer", "fit", "hf_vit_to_timm", "object_relevance",
           "plot", "pretrained_toy_vit", "read_original", "run", "toy_vit", "train"]
