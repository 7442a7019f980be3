"""Lesson 2 — loading models in other data types (notebooks/02_loading_models_in_dtypes.ipynb).

DummyModel (the original course's toy model), printing parameter dtypes, torch's default dtype.
The lesson's sizes, timing and perplexity are in core (sizes, timing, evaluation): every later lesson uses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["DummyModel", "print_param_dtype", "default_dtype"]


class DummyModel(nn.Module):
    """The course's toy model: an embedding and two (linear, layernorm) blocks, then a head."""

    def __init__(self) -> None:
        super().__init__()
        # the course's seed (fp32 logits [-0.6872, 0.7132]), on a forked generator: building a
        # DummyModel leaves the global random state as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            self.token_embedding = nn.Embedding(2, 2)
            self.linear_1 = nn.Linear(2, 2)
            self.layernorm_1 = nn.LayerNorm(2)
            self.linear_2 = nn.Linear(2, 2)
            self.layernorm_2 = nn.LayerNorm(2)
            self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.token_embedding(x)  # (batch, seq, 2)
        hidden = self.layernorm_1(self.linear_1(hidden))
        hidden = self.layernorm_2(self.linear_2(hidden))
        return self.head(hidden)  # (batch, seq, 2)


def print_param_dtype(model: nn.Module) -> None:
    """Print the dtype of every parameter of `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"print_param_dtype expects an nn.Module, got {type(model).__name__}")
    for name, param in model.named_parameters():
        print(f"{name} is loaded in {param.dtype}")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default floating dtype inside a `with` block; restore it even on error."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
