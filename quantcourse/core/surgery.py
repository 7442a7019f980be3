"""Linear-layer surgery: replacing a model's nn.Linear layers, and running a model until chosen
layers have seen their inputs (hooks). Used from Lesson 3 (W8A16) to Lesson 9 (GPTQ).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["run_rows_until_seen", "run_with_input_hooks", "replace_linears"]


def _is_excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """True if `name` equals an entry, ends with ".entry", or lies inside the subtree "entry."."""
    return any(name == e or name.endswith("." + e) or name.startswith(e + ".") for e in exclude)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every layer of interest has seen its input."""


def run_rows_until_seen(model: nn.Module, ids: torch.Tensor, modules: dict[str, nn.Module], record) -> None:
    """Run a causal LM on each row of `ids` (batch, tokens); record(name, x) gets the input x of
    every named module, and each pass stops once all of them have seen theirs.

    What comes after the last of them (for the linear layers, `lm_head`'s logits: a fifth of
    SmolLM2's pass over 512 tokens) would compute nothing that is used. This assumes each module
    runs once per pass, as every nn.Linear of the course's models does. Used by activation_absmax
    (Lesson 6) and run_with_input_hooks (Lesson 8).
    """
    seen: set[str] = set()

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            record(name, args[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _StopForward

        return pre

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            for row in ids:
                seen.clear()
                with contextlib.suppress(_StopForward):
                    model(input_ids=row.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()


def run_with_input_hooks(model: nn.Module, ids: torch.Tensor, names: list[str], consume, skip_first: int = 0) -> None:
    """Run `model` on each row of `ids` (batch, tokens) and call consume(name, x) with the input
    x (tokens, in_features) of every named nn.Linear.

    `skip_first` drops the first tokens of every row: the first token of a sequence carries
    "massive activations" (hundreds of times the others' size, Lesson 8) that would dominate
    statistics meant for ordinary tokens. Each pass stops after the last named layer
    (`run_rows_until_seen`).
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing or not names:
        raise ValueError(f"run_with_input_hooks: not nn.Linear layers of the model: {missing[:3] or names}")
    if ids.dim() != 2 or ids.shape[1] <= skip_first:
        raise ValueError(f"ids must be (batch, tokens) with more than skip_first={skip_first} tokens")
    run_rows_until_seen(
        model,
        ids,
        {n: modules[n] for n in names},
        lambda name, x: consume(name, x.detach()[:, skip_first:].reshape(-1, x.shape[-1])),
    )


def replace_linears(model: nn.Module, make, exclude: tuple[str, ...] | str = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (outside `exclude`) by make(linear), in place; returns the model."""
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_excluded(n, exclude)]
    if not targets:
        raise ValueError("replace_linears: no nn.Linear layer to replace")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(linear))
    return model
