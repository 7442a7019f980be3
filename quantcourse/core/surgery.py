"""Linear-layer surgery: replacing a model's nn.Linear layers, and running a model until chosen
layers have seen their inputs (hooks). Used from Lesson 3 (W8A16) to Lesson 9 (GPTQ).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import defaultdict

import torch
from torch import nn

__all__ = ["run_rows_until_seen", "run_with_input_hooks", "replace_linears", "linears_swapped"]


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


def replace_linears(
    model: nn.Module, make, exclude: tuple[str, ...] | str = ("lm_head",), replacement: str = "the new layer"
) -> nn.Module:
    """Replace every nn.Linear whose qualified name is not excluded by make(linear), in place; returns the model.

    The course's one linear-swap loop, written in Lesson 3 (replace_linear_with_w8a16) and called
    by Lesson 4's replace_linear_with_gguf, Lesson 8 (W8A8, LLM.int8()), Lesson 9's
    quantize_llama_4bit and the benchmark. An entry of `exclude` excludes the module of that name,
    any module whose name ends in "." + it (so "lm_head" is found at any depth) and everything
    inside it. make(linear) may return None: that layer stays as it is. A replaced weight that
    another module shares (SmolLM2's lm_head is tied to the embedding) warns: `replacement` does
    not replace the float tensor, which the other module keeps using.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_linears expects an nn.Module, got {type(model).__name__}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if not all(isinstance(e, str) for e in exclude):
        raise TypeError("exclude must be a string or a sequence of module names (strings)")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_excluded(n, exclude)]
    if not targets:
        raise ValueError("replace_linears: no nn.Linear layer to replace")
    if targets[0][0] == "":
        raise ValueError(
            f"model is itself an nn.Linear: nothing holds it to swap; build {replacement} from it "
            "directly (e.g. W8A16Linear.from_linear(model))"
        )
    owners: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    for name, linear in targets:
        new = make(linear)
        if new is None:
            continue
        tied = [o for o in owners[id(linear.weight)] if not o.startswith(f"{name}.")]
        if tied:
            warnings.warn(
                f"{name}.weight is tied to {tied[0]}: {replacement} does not replace the float "
                "tensor, which stays for the other user (exclude it to keep the tie)",
                stacklevel=_caller_stacklevel(),
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first caller outside this package (a notebook, a script)."""
    level, frame = 2, sys._getframe(2)  # 1: replace_linears, 2: its caller
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("quantcourse."):
        level, frame = level + 1, frame.f_back
    return level


@contextlib.contextmanager
def linears_swapped(model: nn.Module, make, exclude: tuple[str, ...] | str = ("lm_head",)):
    """Inside the block, every nn.Linear but `exclude` is make(linear) (replace_linears, with its
    exclusion rule); the original layers come back afterwards, so one loaded model serves every
    variant (Lesson 11)."""
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_excluded(n, exclude)}
    replace_linears(model, make, exclude=exclude)
    try:
        yield model
    finally:
        for name, layer in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
