"""core/surgery.py: replacing a model's linear layers, and running it until chosen layers have seen their inputs."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import helper


class _Chain(nn.Module):
    """A causal-LM-like chain: embedding, then a, b, c in order; counts the passes that got past b."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)
        self.past_b = 0

    def forward(self, input_ids):
        h = self.b(torch.relu(self.a(self.embed(input_ids))))
        self.past_b += 1
        return SimpleNamespace(logits=self.c(h))


def test_run_rows_until_seen_records_each_rows_inputs_and_stops_after_the_last_module():
    model = _Chain()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    got = []
    helper.run_rows_until_seen(model, ids, {"a": model.a, "b": model.b}, lambda name, x: got.append((name, x)))
    assert [name for name, _ in got] == ["a", "b", "a", "b"]  # one pass per row, in the order the model runs
    assert model.past_b == 0  # each pass stopped as b received its input: neither b nor c ran
    with torch.no_grad():
        for row, (_, x_a), (_, x_b) in zip(ids, got[0::2], got[1::2]):
            embedded = model.embed(row[None])  # (1, 3, 4): one row at a time
            assert torch.equal(x_a, embedded) and torch.equal(x_b, torch.relu(model.a(embedded)))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_run_rows_until_seen_removes_its_hooks_when_recording_fails():
    model = _Chain()

    def fail(name, x):
        raise RuntimeError("recording failed")

    with pytest.raises(RuntimeError, match="recording failed"):
        helper.run_rows_until_seen(model, torch.tensor([[1, 2]]), {"b": model.b}, fail)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_run_with_input_hooks_gives_tokens_by_features_without_the_first_tokens(tiny_llama):
    model, ids = tiny_llama  # (2 rows, 16 tokens)
    name = "model.layers.0.self_attn.q_proj"
    got = []
    helper.run_with_input_hooks(model, ids, [name], lambda n, x: got.append((n, x)), skip_first=3)
    layer = model.model.layers[0]
    with torch.no_grad():  # q_proj reads the first layer's norm of the token embeddings
        expected = layer.input_layernorm(model.model.embed_tokens(ids))[:, 3:]  # (2, 13, 64)
    assert [n for n, _ in got] == [name, name]
    for (_, x), row in zip(got, expected):
        assert x.shape == (13, 64) and not x.requires_grad
        torch.testing.assert_close(x, row, rtol=0, atol=1e-6)


def test_run_with_input_hooks_refuses_what_it_cannot_hook(tiny_llama):
    model, ids = tiny_llama
    with pytest.raises(ValueError, match="not nn.Linear"):
        helper.run_with_input_hooks(model, ids, ["model.layers.0.input_layernorm"], print)
    with pytest.raises(ValueError, match="not nn.Linear"):
        helper.run_with_input_hooks(model, ids, [], print)
    with pytest.raises(ValueError, match="skip_first=16"):
        helper.run_with_input_hooks(model, ids, ["model.layers.0.self_attn.q_proj"], print, skip_first=16)
    with pytest.raises(ValueError, match="batch, tokens"):
        helper.run_with_input_hooks(model, ids[0], ["model.layers.0.self_attn.q_proj"], print)


def test_replace_linears_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        helper.replace_linears(nn.Sequential(nn.ReLU()), helper.W8A8Linear.from_linear)
