"""vitlens: mechanistic analysis of timm Vision Transformers.

Hook real timm ViTs with TransformerLens hook points (:class:`HookedViT`), record what flows through them
into crash-safe HDF5 caches (:class:`ActivationStore`, :func:`record`) and run analyses over those caches.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "HookedViT": "vitlens.hooked",
    "TokenLayout": "vitlens.hooked",
    "ActivationCache": "vitlens.hooked",
    "UnknownHookError": "vitlens.hooked",
    "UnsupportedModelError": "vitlens.hooked",
    "load_model": "vitlens.zoo",
    "random_twin": "vitlens.zoo",
    "WeightsNotFoundError": "vitlens.zoo",
    "ActivationStore": "vitlens.store",
    "StoreMismatchError": "vitlens.store",
    "CorruptShardError": "vitlens.store",
    "NotRecordedError": "vitlens.store",
    "record": "vitlens.recorder",
    "Reducer": "vitlens.recorder",
    "Computation": "vitlens.recorder",
    "load_dataset": "vitlens.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """Import the public names lazily, so that `import vitlens` stays cheap."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vitlens' has no attribute {name!r}")
