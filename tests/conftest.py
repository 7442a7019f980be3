"""Shared fixtures: a tiny random Llama for tests of code paths only (never for claims about a trained model).

The course's package is imported here, before any test module: its import hook, which keeps bitsandbytes
off its AVX512-BF16 kernel in the forced-AVX2 pass, must be in place before a test module imports
bitsandbytes (quantcourse/__init__.py).
"""

import pytest
import torch

import quantcourse  # noqa: F401  (first: see the docstring)


@pytest.fixture
def tiny_llama():
    """(model, ids): a 2-layer Llama with grouped-query attention and random weights, and token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms that are not all ones, so that folding a scale into them is tested
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, ids
