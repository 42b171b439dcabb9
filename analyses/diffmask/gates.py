"""DiffMask's gates: the weight-normed MLP that reads two hidden states per token, and the hard-concrete gate.

Each gate reads, per token, the concatenation [state 0; state i] of the (CLS-prefixed) patch embedding and one
hidden state and gives a logit ``tanh(W2 tanh(W1 [h0; hi] + b1) + b2) * mul_activation + add_activation``
(Vision-DiffMask's ``MLPMaxGate``; ``add_activation`` is learned). The logit parameterises a hard-concrete gate
(a binary concrete of temperature 0.2 stretched to (-0.2, 1) and clamped to [0, 1]), which is exactly zero with
positive probability; its expected L0 norm is ``P(z > 0) = sigmoid(logit + 0.2 ln 5)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import RelaxedBernoulli
from torch.nn.utils.parametrizations import weight_norm

TEMPERATURE = 0.2
LOW, HIGH = -0.2, 1.0
#: log P(z > 0) = logsigmoid(logit + L0_SHIFT), with L0_SHIFT = -T log(-l / r) = 0.2 ln 5 = 0.32189
L0_SHIFT = -TEMPERATURE * math.log(-LOW / HIGH)


class Gate(nn.Module):
    """One gate: [batch pos d_model] x 2 -> logits [batch pos].

    ``f`` is Linear(2 d_model, hidden) -> tanh -> Linear(hidden, 1) -> tanh, both Linear layers weight-normed
    (``f.0.parametrizations.weight.original0`` is the original's ``weight_g``, ``original1`` its ``weight_v``).
    """

    def __init__(self, d_model: int, hidden: int, mul_activation: float, add_activation: float):
        super().__init__()
        self.f = nn.Sequential(weight_norm(nn.Linear(2 * d_model, hidden)), nn.Tanh(),
                               weight_norm(nn.Linear(hidden, 1)), nn.Tanh())
        self.add_activation = nn.Parameter(torch.tensor(float(add_activation)))
        self.mul_activation = float(mul_activation)

    def forward(self, state0: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.f(torch.cat([state0, state], -1)).squeeze(-1) * self.mul_activation + self.add_activation


def sample_gates(logits: torch.Tensor) -> torch.Tensor:
    """Reparameterised hard-concrete samples in [0, 1], same shape as `logits` (differentiable)."""
    temperature = torch.tensor(TEMPERATURE, dtype=logits.dtype, device=logits.device)
    relaxed = RelaxedBernoulli(temperature, logits=logits).rsample()
    return (relaxed * (HIGH - LOW) + LOW).clamp(0.0, 1.0)


def log_keep_probability(logits: torch.Tensor) -> torch.Tensor:
    """log P(z > 0) of hard-concrete gates with these logits (the log expected L0 norm), same shape."""
    return F.logsigmoid(logits + L0_SHIFT)
