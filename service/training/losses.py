"""Hashing losses, registered by name.

Each loss keeps a memory bank of the relaxed outputs and labels of every training image
(as DPSH and HashNet do in their reference implementations), so a mini-batch is compared with
the whole training set rather than with itself only. The bank lives in module buffers, so it
is saved with checkpoints and training resumes exactly.

Call signature: ``loss(u, labels, index, progress) -> (total, parts)`` where ``u`` is the
hasher's pre-activation output (B, K), ``labels`` multi-hot (B, C), ``index`` the positions of
the batch in the training set and ``progress`` in [0, 1] the share of training done.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from service.registry import Registry

LOSSES: Registry[nn.Module] = Registry("hashing loss")


class BankLoss(nn.Module):
    """Base class holding the memory bank ``U`` (N, K) and ``Y`` (N, C)."""

    def __init__(self, num_train: int, bits: int, num_classes: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("U", torch.zeros(num_train, bits))
        self.register_buffer("Y", torch.zeros(num_train, num_classes))

    def update_bank(self, code: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        self.U[index] = code.detach()
        self.Y[index] = labels.float()

    def similarity(self, labels: torch.Tensor) -> torch.Tensor:
        """s_ij = 1 when batch item i shares a label with bank item j."""
        return (labels.float() @ self.Y.t() > 0).float()


def _pairwise_nll(theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Elementwise -log p(s | theta) with p(s=1) = sigmoid(theta): softplus(theta) - s*theta."""
    return F.softplus(theta) - s * theta


@LOSSES.register("dpsh")
class DPSHLoss(BankLoss):
    """DPSH (Li, Wang, Kang 2016): pairwise likelihood on 0.5*<u_i, u_j> + quantisation.

    Args:
        eta: weight of the quantisation term ||u - sign(u)||^2 / K.
        activation: "none" uses the raw outputs as in the paper; "tanh" bounds them, which
            keeps the inner products in a range where the likelihood does not saturate
            (pure DPSH from scratch collapsed in a trial here).
    """

    def __init__(
        self, num_train: int, bits: int, num_classes: int, eta: float = 0.1,
        activation: str = "tanh",
    ) -> None:
        super().__init__(num_train, bits, num_classes)
        if activation not in ("none", "tanh"):
            raise ValueError("activation must be 'none' or 'tanh'")
        self.eta = eta
        self.activation = activation

    def forward(
        self, u: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        code = torch.tanh(u) if self.activation == "tanh" else u
        self.update_bank(code, labels, index)
        s = self.similarity(labels)
        theta = 0.5 * code @ self.U.t()
        # With tanh the inner product is at most K/2; scale it back to a DPSH-like range.
        if self.activation == "tanh":
            theta = theta * (32.0 / self.bits)
        likelihood = _pairwise_nll(theta, s).mean()
        quant = (code - code.sign()).pow(2).mean()
        total = likelihood + self.eta * quant
        return total, {"likelihood": likelihood.item(), "quant": quant.item()}


@LOSSES.register("hashnet")
class HashNetLoss(BankLoss):
    """HashNet (Cao et al. 2017): weighted pairwise cross-entropy on tanh(beta*u).

    Pairs are weighted so that similar and dissimilar pairs contribute equally (the paper's
    answer to data imbalance); beta grows during training (continuation) so that tanh(beta*u)
    approaches sign(u).

    Args:
        alpha: scale of the inner product inside the sigmoid (the paper's adaptive alpha).
        beta_max: beta at the end of training; beta = 1 + (beta_max - 1) * sqrt(progress),
            a smooth version of the paper's step-wise square-root schedule.
    """

    def __init__(
        self, num_train: int, bits: int, num_classes: int, alpha: float = 0.1,
        beta_max: float = 10.0,
    ) -> None:
        super().__init__(num_train, bits, num_classes)
        self.alpha = alpha
        self.beta_max = beta_max

    def beta(self, progress: float) -> float:
        return 1.0 + (self.beta_max - 1.0) * math.sqrt(max(0.0, min(1.0, progress)))

    def forward(
        self, u: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        code = torch.tanh(self.beta(progress) * u)
        self.update_bank(code, labels, index)
        s = self.similarity(labels)
        theta = self.alpha * code @ self.U.t()
        nll = _pairwise_nll(theta, s)
        pos = s > 0
        n_pos = pos.sum().clamp(min=1)
        n_neg = (~pos).sum().clamp(min=1)
        weight = torch.where(pos, s.numel() / n_pos, s.numel() / n_neg)
        total = (nll * weight).sum() / weight.sum()
        return total, {"wce": total.item(), "beta": self.beta(progress)}


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for single-label data, binary cross-entropy for multi-label data."""
    if bool((labels.sum(1) == 1).all()):
        return F.cross_entropy(logits, labels.argmax(1))
    return F.binary_cross_entropy_with_logits(logits, labels.float())
