"""The published ViT analyses, one module per method, built on :mod:`vitlens`.

Each module offers functions over tensors, a ``run(...)`` over a store or dataset, and a ``plot(...)``.
Dependencies point one way: ``analyses -> vitlens``, never back.
"""
