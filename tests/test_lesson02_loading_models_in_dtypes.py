"""Lesson 2 (loading models in different data types): the DummyModel, dtype printing, the default dtype."""

import copy

import pytest
import torch

import helper

DUMMY_INPUT = torch.LongTensor([[1, 0], [0, 1]])


# --- DummyModel, print_param_dtype -------------------------------------------------------


def test_dummy_model_reproduces_the_course_logits():
    with torch.no_grad():
        logits = helper.DummyModel()(DUMMY_INPUT)
    expected = torch.tensor([-0.6872, 0.7132]).expand(2, 2, 2)
    assert logits.shape == (2, 2, 2)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_dummy_model_runs_in_half_precisions_close_to_fp32():
    model = helper.DummyModel()
    with torch.no_grad():
        reference = model(DUMMY_INPUT)
        for dtype in (torch.float16, torch.bfloat16):
            out = copy.deepcopy(model).to(dtype)(DUMMY_INPUT)
            assert out.dtype == dtype
            assert (out.float() - reference).abs().max() < 1e-2


def test_building_a_dummy_model_leaves_the_global_generator_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    helper.DummyModel()
    assert torch.equal(torch.rand(3), expected)
    logits = helper.DummyModel()(torch.tensor([[1, 0]]))[0, 0]
    assert torch.allclose(logits, torch.tensor([-0.6872, 0.7132]), atol=1e-4)


def test_dummy_model_is_44_bytes():
    # 11 parameter tensors: embedding 2x2, three linears (2x2 + 2), two layernorms (2 + 2)
    assert helper.model_size(helper.DummyModel()) == (4 + 3 * 6 + 2 * 4) * 4


def test_print_param_dtype_lists_every_parameter(capsys):
    helper.print_param_dtype(helper.DummyModel().half())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11  # embedding weight + 5 modules x (weight, bias)
    assert lines[0] == "token_embedding.weight is loaded in torch.float16"
    assert all(line.endswith("torch.float16") for line in lines)


def test_print_param_dtype_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        helper.print_param_dtype({"weight": torch.zeros(1)})


# --- default_dtype -----------------------------------------------------------------------


def test_default_dtype_applies_inside_and_restores_on_normal_exit():
    before = torch.get_default_dtype()
    with helper.default_dtype(torch.bfloat16):
        assert torch.get_default_dtype() == torch.bfloat16
        layer = torch.nn.Linear(2, 2)
    assert layer.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == before
    assert torch.nn.Linear(2, 2).weight.dtype == before


def test_default_dtype_restores_when_the_block_raises():
    before = torch.get_default_dtype()
    with pytest.raises(ZeroDivisionError):
        with helper.default_dtype(torch.float64):
            assert torch.get_default_dtype() == torch.float64
            raise ZeroDivisionError
    assert torch.get_default_dtype() == before
