"""SelaVPR's bottleneck adapter (global adaptation)."""

import torch
from torch import nn


class Adapter(nn.Module):
    """fc2(relu(fc1(x))), optionally added back to its input.

    Shapes: (..., dim) -> (..., dim), hidden size int(dim * ratio).
    `skip=True` is the serial adapter (after attention), `skip=False` the parallel one (beside the MLP).
    The parameter names D_fc1 / D_fc2 are those of the public checkpoints.
    """

    def __init__(self, dim: int, *, ratio: float = 0.5, skip: bool = True) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.D_fc2 = nn.Linear(hidden, dim)
        self.zero_init_output()

    def zero_init_output(self) -> None:
        # A zero output layer makes the adapted network start exactly as the plain pre-trained one
        # (the serial adapter is then the identity, the parallel one adds nothing).
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.D_fc2(self.act(self.D_fc1(x)))
        return x + out if self.skip else out
