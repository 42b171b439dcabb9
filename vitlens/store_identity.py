"""What identifies an ActivationStore, and the first place where a request to read, resume or extend it differs.

A store may be resumed or read only with the model (tag, weights), preprocessing, token layout, sample list,
dtype, autocast, shard size and output set (with token selections and codecs, without the shapes known only
after a forward) it was recorded with. :func:`identity_difference` walks the JSON metadata and names the
first differing field and location, e.g. ``sample list differs at label[3]: store 7, request 2``, so that
every refusal says exactly what changed.
"""
from __future__ import annotations

import re
from typing import Any, Mapping


def identity_difference(meta: Mapping, request: Mapping, source: str = "request") -> str | None:
    """``"<field> differs[ at <where>]: store <a>, <source> <b>"`` for the first identity field of `request`
    (plain JSON, fields absent from it are not compared) that differs from the store's `meta`, or None."""
    for label, key in _IDENTITY:
        wanted = _lookup(request, key)
        if isinstance(wanted, _Absent):
            continue
        stored = _lookup(meta, key)
        if key == ("outputs",):
            stored, wanted = _without_shapes(stored), _without_shapes(wanted)
        if stored == wanted:  # fast path: the walk below is slow on long sample lists
            continue
        difference = _first_difference(stored, wanted)
        if difference:
            where, a, b = difference
            detail = f" at {where}" if where and label not in ("model tag", "weights hash") else ""
            return f"{label} differs{detail}: store {_short(a)}, {source} {_short(b)}"
    return None


class _Absent:
    def __repr__(self) -> str:
        return "absent"


def _first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """(location, a's value, b's value) of the first place where two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key, _Absent()), b.get(key, _Absent()),
                                      f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return where, f"{len(a)} entries", f"{len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b or isinstance(a, _Absent) and isinstance(b, _Absent) else (where, a, b)


def _short(value: Any) -> str:
    """A value for an error message: hashes are cut to 12 characters; other values are shown whole."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32,}", value):
        return value[:12] + "…"
    return value if isinstance(value, str) and value.endswith(" entries") else repr(value)


# What must agree between a store and a request to read, resume or extend it: (label, path in store.json).
_IDENTITY = (
    ("model tag", ("model", "tag")),
    ("weights hash", ("model", "weights_hash")),
    ("preprocessing", ("preprocessing",)),
    ("token layout", ("layout",)),
    ("sample list", ("samples",)),
    ("dtype", ("dtype",)),
    ("autocast", ("autocast",)),
    ("shard size", ("shard_size",)),
    ("output set", ("outputs",)),
)


def _lookup(meta: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(meta, Mapping) or key not in meta:
            return _Absent()
        meta = meta[key]
    return meta


def _without_shapes(outputs: Mapping[str, Mapping]) -> dict:
    return {name: {k: v for k, v in spec.items() if k != "shape"} for name, spec in outputs.items()}
