"""Class-embedding projection: every token at every layer read as class evidence (vit-cls_emb, §A4-A5).

A token's residual (or a sub-layer's output) projected through the final norm and the classifier head gives
its class logits; the label's rank there says how far the token has built the class. The projections are
computed on the device during the recording, as :class:`~vitlens.recorder.Reducer` s, so dataset-scale studies
keep two bytes per token and layer instead of an activation.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from vitlens.recorder import Reducer


class ClassRankReducer(Reducer):
    """Rank of the label class under the class-embedding projection of every token at every layer.

    For layer l and token t, ``rank = #{classes c : unembed(resid[l, t])[c] > unembed(resid[l, t])[label]}``
    (0 = the label is the top class), with ``model.unembed`` = head(final_norm(resid)). Stored as int16
    ``[n_samples, n_layers, n_tokens]``: the per-token identifiability curves of vit-cls_emb at dataset
    scale, for 2 bytes per token and layer instead of a d_model vector. Tied classes do not count, so a
    tie places the label first (vit-cls_emb's unstable argsort places it anywhere among them).

    The projection costs a [d_model x classes] product per token and layer, about 10% of ViT-B's compute.
    ``precision`` says how it is computed, always outside any autocast of the forward:

    - ``"float32"`` (default): float32 logits, the ranks of vit-cls_emb.
    - ``"bfloat16"``: the normed tokens and the head rounded to bfloat16, products summed in float32
      (half the cost on a CPU with AMX; GPUs run it on their bfloat16 units). The label's logit is
      subtracted inside the product, so the sign of each difference is not rounded away and no bfloat16
      ties appear; a class can move across the label only when their float32 logits differ by less than
      ``2**-7 * (m_c + m_label)``, with ``m_c = sum_i |z_i W_ic| + |b_c|`` (about 1% of the logit scale).
    """

    dtype = "int16"
    PRECISIONS = ("float32", "bfloat16")

    def __init__(self, hook: str = "hook_resid_post", name: str = "class_rank", precision: str = "float32"):
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {self.PRECISIONS}")
        self.hook, self.name, self.precision = hook, name, precision

    def hooks(self, model) -> list[str]:
        return [f"blocks.{layer}.{self.hook}" for layer in range(model.cfg.n_layers)]

    def shape(self, model) -> tuple[int, ...]:
        if model.cfg.d_vocab > torch.iinfo(torch.int16).max:
            raise ValueError(f"{model.cfg.d_vocab} classes do not fit the int16 ranks of {self.name}")
        return model.cfg.n_layers, model.layout.n_tokens

    def reduce(self, model, activation, labels):
        """[batch pos d_model] -> int16 [batch pos]."""
        with torch.autocast(activation.device.type, enabled=False):
            normed = model.final_norm(activation.float())
            if self.precision == "float32":
                logits = model.vit.head(normed)
                label_logit = logits.gather(-1, labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1))
                return torch.count_nonzero(logits > label_logit, dim=-1).to(torch.int16)
            return _bfloat16_rank(normed, model.W_U, model.b_U, labels)


def _bfloat16_rank(normed: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """int16 [batch pos]: #{c : z.W_c + b_c > z.W_y + b_y} for z, W, b rounded to bfloat16.

    One bfloat16 matmul computes ``z.W_c + b_c - L`` for every class, with L, the label's logit, computed
    from the same rounded operands (exact products, a float32 sum) and fed in as three bfloat16 parts
    against rows of ones. The matmul sums in float32; rounding its output to bfloat16 keeps the sign.
    """
    z, W, b = normed.bfloat16(), W_U.bfloat16(), b_U.bfloat16()
    label_columns = W.T[labels].float().unsqueeze(-1)  # [batch d_model 1]
    label_logit = torch.bmm(z.float(), label_columns).squeeze(-1) + b[labels].float()[:, None]
    parts, rest = [], -label_logit  # three bfloat16 parts hold a float32 exactly
    for _ in range(3):
        parts.append(rest.bfloat16())
        rest = rest - parts[-1].float()
    lhs = torch.cat([z, z.new_ones(*z.shape[:-1], 1), torch.stack(parts, -1)], -1)  # [batch pos d_model+4]
    rhs = torch.cat([W, b[None], W.new_ones(3, W.shape[1])])  # [d_model+4 classes]
    with _float32_bfloat16_sums(z.device):
        diff = lhs @ rhs  # z.W_c + b_c - L
    above = diff > 0
    above.scatter_(-1, labels.view(-1, 1, 1).expand(-1, z.shape[1], 1), False)  # the label's own difference is ~0
    return torch.count_nonzero(above, dim=-1).to(torch.int16)


@contextmanager
def _float32_bfloat16_sums(device: torch.device):
    """cuBLAS may add split-K partial sums of a bfloat16 matmul in bfloat16; forbid it (a global flag, restored)."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    allowed = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = allowed
