"""Model names -> timm models wrapped in :class:`~vitlens.HookedViT`, loaded without touching a network.

``load_model`` accepts:

* a nickname from :data:`ZOO` (the seeds' model names and the bundled ``tiny-scenes``);
* any timm model name, with or without a pretrained tag (``vit_base_patch16_224.augreg_in21k_ft_in1k``),
  whose weights come from the user's Hugging Face cache, a ``checkpoint=`` file, or random init
  (``pretrained=False``);
* ``local-dir:/path`` or a directory holding ``config.json`` + ``model.safetensors``
  (timm's ``save_for_hf`` format);
* a checkpoint file (``.safetensors``, or ``.pth``/``.bin`` read with ``torch.load(weights_only=True)``)
  together with ``arch=``.

Weights are never fetched from a hub unless ``allow_download=True``: a missing file is a
:class:`WeightsNotFoundError` that names the file or cache entry to provide.
"""
from importlib import import_module

from vitlens.zoo.catalog import WEIGHT_SUFFIXES, ZOO, ZooEntry

__all__ = ["WEIGHT_SUFFIXES", "ZOO", "BUNDLED_DIR", "WeightsNotFoundError", "ZooEntry", "list_models", "load_model",
           "random_twin"]


def __getattr__(name):
    """The loaders import torch and timm, so they load on first use (``vitlens --help`` imports the catalog)."""
    if name in __all__:
        return getattr(import_module("vitlens.zoo.loading"), name)
    raise AttributeError(f"module 'vitlens.zoo' has no attribute {name!r}")
