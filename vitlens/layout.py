"""TokenLayout: where each token of a ViT sequence sits (CLS, distillation, registers, patch grid).

Kept apart from the model so that store readers can describe tokens without importing torch: only
:meth:`TokenLayout.tokens` (which returns a tensor) and :meth:`TokenLayout.from_timm` touch it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

TOKEN_KINDS = ("all", "cls", "dist", "registers", "prefix", "patches")
"""The token kinds :meth:`TokenLayout.indices` accepts (importable without torch, for argument checks)."""


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in the sequence: prefix tokens first, then patches in row-major order.

    Attributes:
        cls_index: index of the class token, or None for models without one.
        dist_index: index of the DeiT distillation token, or None.
        register_indices: indices of register tokens (empty when none).
        n_prefix: number of tokens before the first patch (``num_prefix_tokens``).
        grid: the patch grid (rows, cols) for the model's default image size.
    """

    cls_index: Optional[int]
    dist_index: Optional[int]
    register_indices: tuple[int, ...]
    n_prefix: int
    grid: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def with_grid(self, grid: Sequence[int]) -> "TokenLayout":
        """The same layout for another image size (dynamic_img_size models)."""
        return TokenLayout(self.cls_index, self.dist_index, self.register_indices, self.n_prefix,
                           (int(grid[0]), int(grid[1])))

    def indices(self, kind: str = "all") -> list[int]:
        """Token indices of one kind as a list: "all", "cls", "dist", "registers", "prefix" or "patches"."""
        kinds = {
            "all": range(self.n_tokens),
            "cls": [] if self.cls_index is None else [self.cls_index],
            "dist": [] if self.dist_index is None else [self.dist_index],
            "registers": self.register_indices,
            "prefix": range(self.n_prefix),
            "patches": range(self.n_prefix, self.n_tokens),
        }
        if kind not in kinds:
            raise ValueError(f"Unknown token kind {kind!r}; expected one of {sorted(TOKEN_KINDS)}.")
        if kind == "cls" and self.cls_index is None:
            raise ValueError("This model has no class token (global-average-pool family); use 'patches'.")
        return list(kinds[kind])

    def tokens(self, kind: str = "all"):
        """Token indices of one kind as a long tensor (see :meth:`indices`)."""
        import torch

        return torch.tensor(self.indices(kind), dtype=torch.long)

    def patch_position(self, token: int) -> tuple[int, int]:
        """(row, col) of a patch token on the grid."""
        if not self.n_prefix <= token < self.n_tokens:
            raise ValueError(f"Token {token} is not a patch token (patches are {self.n_prefix}..{self.n_tokens - 1}).")
        return divmod(token - self.n_prefix, self.grid[1])

    def describe(self, token: int) -> str:
        """A readable name for a token: "cls", "dist", "reg0", or "patch(r,c)"."""
        if token == self.cls_index:
            return "cls"
        if token == self.dist_index:
            return "dist"
        if token in self.register_indices:
            return f"reg{self.register_indices.index(token)}"
        return "patch({},{})".format(*self.patch_position(token))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        """Inverse of :meth:`to_dict` (also from JSON, where tuples became lists)."""
        return cls(d["cls_index"], d["dist_index"], tuple(d["register_indices"]), d["n_prefix"], tuple(d["grid"]))

    @classmethod
    def from_timm(cls, vit) -> "TokenLayout":
        """The layout of a timm ``VisionTransformer`` at its default image size."""
        has_cls = getattr(vit, "cls_token", None) is not None
        has_dist = getattr(vit, "dist_token", None) is not None
        n_reg = vit.reg_token.shape[1] if getattr(vit, "reg_token", None) is not None else 0
        first_reg = int(has_cls) + int(has_dist)
        return cls(
            cls_index=0 if has_cls else None,
            dist_index=int(has_cls) if has_dist else None,
            register_indices=tuple(range(first_reg, first_reg + n_reg)),
            n_prefix=vit.num_prefix_tokens,
            grid=tuple(int(g) for g in vit.patch_embed.grid_size),
        )
