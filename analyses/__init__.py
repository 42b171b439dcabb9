"""The published ViT analyses, one module per method, built on :mod:`vitlens`.

Each module offers functions over tensors, a ``run(...)`` over a store or dataset, and a ``plot(...)``.
Dependencies point one way: ``analyses -> vitlens``, never back.
"""


def __getattr__(name):
    """``analyses.explain``: the explanation module, which is also callable as ``explain(model, images, method)``
    (imported on first use, so that ``import analyses`` stays cheap)."""
    if name == "explain":
        from importlib import import_module

        return import_module("analyses.explain")
    raise AttributeError(f"module 'analyses' has no attribute {name!r}")
