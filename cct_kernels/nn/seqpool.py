"""SeqPool as a module: an nn.Linear(D, 1) (the official `attention_pool`) whose forward pools the sequence."""
from __future__ import annotations

from torch import nn

from cct_kernels import ops
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_int


class SeqPool(UsesBackend, nn.Linear):
    """(B, N, D) -> (B, D): softmax over N of the Linear(D, 1) scores, then the weighted sum of the tokens."""

    def __init__(self, dim: int):
        super().__init__(check_int("dim", dim, 1), 1)

    def forward(self, x, mask=None):
        """mask None or (B, N) bool, True = real token: pool over real tokens only."""
        return ops.seqpool(x, self.weight, self.bias, mask=mask, backend=self.backend)
