"""Lesson 6 (dynamic quantization): module counts, logits differences and activation maxima on tiny models."""

import copy
import warnings

import pytest
import torch
from torch import nn

import helper


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (the lesson shows the warning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=11, n_positions=16, tie_word_embeddings=True)
    return GPT2LMHeadModel(config).eval()


class _TinyLM(nn.Module):
    """Causal-LM-like wrapper: embedding, two linears, `.logits` output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 4)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.fc2(torch.relu(self.fc1(self.embed(input_ids)))))


class _WordTokenizer:
    """Maps each character of a string to an id (enough for activation_absmax)."""

    def __call__(self, text, return_tensors="pt"):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 5 for c in text]]))


def test_count_modules_before_after_quantize_dynamic():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.LayerNorm(2))
    before = helper.count_modules(model)
    assert before == {"Sequential": 1, "Linear": 2, "ReLU": 1, "LayerNorm": 1}
    after = helper.count_modules(_quantize_dynamic(model))
    assert after["quantized.dynamic.Linear"] == 2 and after["Linear"] == 0
    assert after["LayerNorm"] == 1
    with pytest.raises(TypeError):
        helper.count_modules(42)


def test_count_modules_gpt2_conv1d_is_not_replaced():
    model = _tiny_gpt2()
    after = helper.count_modules(_quantize_dynamic(copy.deepcopy(model)))
    assert helper.count_modules(model)["Conv1D"] == 2 * 4
    assert after["Conv1D"] == 2 * 4  # Conv1D is not nn.Linear: untouched
    assert after["quantized.dynamic.Linear"] == 1  # only the tied lm_head


def test_logits_diff_identical_and_shifted():
    model = _TinyLM().eval()
    ids = torch.tensor([[0, 1, 2, 3]])
    assert helper.logits_diff(model, model, ids) == (0.0, 0.0)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.fc2.bias += torch.tensor([0.5, 0.0, 0.0, 0.0, -1.0])
    mean, biggest = helper.logits_diff(model, shifted, ids)
    assert biggest == pytest.approx(1.0, abs=1e-6)
    assert mean == pytest.approx(1.5 / 5, abs=1e-6)
    with pytest.raises(TypeError):
        helper.logits_diff(model, model, [[0, 1]])


def test_activation_absmax_matches_manual_and_removes_hooks():
    model = _TinyLM().eval()
    tokenizer = _WordTokenizer()
    text = "abcde"
    absmax = helper.activation_absmax(model, tokenizer, text)
    assert set(absmax) == {"fc1", "fc2"}
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        x1 = model.embed(ids)[0]
        x2 = torch.relu(model.fc1(x1))
    assert torch.equal(absmax["fc1"], x1.abs().amax(0))
    assert torch.equal(absmax["fc2"], x2.abs().amax(0))
    assert all(not m._forward_pre_hooks for m in model.modules())
    only = helper.activation_absmax(model, tokenizer, text, module_filter=lambda n, m: n == "fc2")
    assert set(only) == {"fc2"}
    with pytest.raises(ValueError):
        helper.activation_absmax(model, tokenizer, text, module_filter=lambda n, m: False)


def test_activation_absmax_stops_each_pass_after_the_last_selected_module():
    model = _TinyLM().eval()
    ran = []
    model.fc2.register_forward_hook(lambda module, args, out: ran.append("fc2"))
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])  # two rows: every row is read
    first = helper.activation_absmax(model, None, ids=ids, module_filter=lambda n, m: n == "fc1")
    assert ran == []  # fc2 (after fc1) never ran
    with torch.no_grad():
        x = model.embed(ids)
    assert torch.equal(first["fc1"], x.reshape(-1, x.shape[-1]).abs().amax(0))
    helper.activation_absmax(model, None, ids=ids)  # fc2 selected: it runs its pre-hook, then the pass stops
    assert ran == [] and all(not m._forward_pre_hooks for m in model.modules())
