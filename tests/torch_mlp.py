"""The small torch MLP of the initialisation and hot-swap tests: lin0 (12 → 16), ReLU, lin1 (16 → 10)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(12, 16)
        self.lin1 = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def torch_mlp(seed: int = 0) -> Mlp:
    """A :class:`Mlp` initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return Mlp()
