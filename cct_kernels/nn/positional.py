"""Positional embedding tables."""
from __future__ import annotations

import torch


def sinusoidal_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """The official fixed table (1, num_positions, dim): p / 10000**(2*(i//2)/dim), sin on even i, cos on odd i."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    # Angles in float64 then sin/cos in float32, as the official table (Python floats into a FloatTensor).
    angle = (position / 10000**exponent).to(torch.float32)
    return torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos()).unsqueeze(0)
