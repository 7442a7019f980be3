"""Lesson 2 (loading models in different data types): helper code the notebook relies on."""

import copy
import time

import pytest
import torch

import helper
from quantcourse.core import generation

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


# --- fresh_process_peak_mb ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peak_sees_the_child_allocation():
    idle = helper.fresh_process_peak_mb("pass")
    busy = helper.fresh_process_peak_mb("data = b'x' * 200_000_000")  # touches 200 MB
    assert 0 < idle < busy
    assert 180 < busy - idle < 260


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peak_does_not_inherit_the_parent_size():
    ballast = b"y" * 800_000_000  # the parent holds 800 MB: ru_maxrss would leak it to the child
    assert helper.peak_rss_mb() > 800
    assert helper.fresh_process_peak_mb("pass") < 600  # the child imports torch (~250 MB), no more
    del ballast


@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peak_reports_child_errors():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        helper.fresh_process_peak_mb("1 / 0")


def test_fresh_process_peak_rejects_non_str_code():
    with pytest.raises(TypeError, match="str"):
        helper.fresh_process_peak_mb(b"pass")


# --- load_image errors -------------------------------------------------------------------


def test_load_image_reads_an_asset_as_rgb():
    image = helper.load_image(helper.asset_path("coffee.jpg"))
    assert image.mode == "RGB" and image.width > 0


def test_load_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        helper.load_image(tmp_path / "nope.jpg")


def test_load_image_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        helper.load_image(path)


def test_load_image_wrong_type():
    with pytest.raises(TypeError, match="path or URL"):
        helper.load_image(42)


def test_load_image_unreachable_url_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConnectionError):
        helper.load_image("http://127.0.0.1:9/x.jpg", timeout=2.0)  # port 9 refuses at once
    assert time.perf_counter() - start < 5


# --- load_hub_model offline --------------------------------------------------------------


# --- the BLIP captioning path (online option), exercised on a tiny random BLIP -----------


@pytest.fixture(scope="module")
def tiny_blip():
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = BertTokenizerFast(vocab_file=str(helper.minilm_dir() / "vocab.txt"), do_lower_case=True)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    ids = dict(
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        **ids,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    return model.eval(), processor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_get_generation_captions_with_a_tiny_blip(tiny_blip, monkeypatch, dtype):
    model, processor = tiny_blip
    model = copy.deepcopy(model).to(dtype)
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update({k: v.dtype for k, v in kwargs.items() if torch.is_tensor(v)})
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    caption = helper.get_generation(
        model, processor, helper.load_image(helper.asset_path("coffee.jpg")), dtype, max_new_tokens=4
    )
    assert isinstance(caption, str)
    assert seen["pixel_values"] == dtype


def test_only_floating_inputs_are_cast(tiny_blip):
    _, processor = tiny_blip
    image = helper.load_image(helper.asset_path("coffee.jpg"))
    batch = generation._cast_floating(processor(images=image, text="a picture of", return_tensors="pt"), torch.bfloat16)
    assert batch["pixel_values"].dtype == torch.bfloat16
    assert batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.int64


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peaks_each_child_has_its_own_peak_and_keeps_its_name():
    ballast = b"y" * 800_000_000  # this process holds 800 MB; ru_maxrss would carry it into a child
    assert helper.peak_rss_mb() > 800
    codes = {"idle": "pass", "busy": "data = b'x' * 300_000_000\ndel data", "idle2": "pass"}
    peaks = helper.fresh_process_peaks_mb(codes, workers=1)  # one after the other: idle2 is forked after busy
    del ballast
    assert list(peaks) == ["idle", "busy", "idle2"]
    assert peaks["idle"] < 600  # not the caller's 800 MB
    assert peaks["busy"] - peaks["idle"] > 250  # the child's own 300 MB
    assert abs(peaks["idle2"] - peaks["idle"]) < 50  # not the earlier child's peak: the server never held it
    with pytest.raises(TypeError, match="non-empty dict"):
        helper.fresh_process_peaks_mb({})
    with pytest.raises(ValueError, match="workers"):
        helper.fresh_process_peaks_mb({"idle": "pass"}, workers=0)
    with pytest.raises(TypeError, match="str"):
        helper.fresh_process_peaks_mb({"idle": b"pass"})


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peaks_reports_which_child_failed():
    with pytest.raises(RuntimeError, match=r"'bad'(.|\n)*ZeroDivisionError"):
        helper.fresh_process_peaks_mb({"fine": "pass", "bad": "1 / 0"})


@pytest.mark.slow
@pytest.mark.cpu_independent  # process memory, no kernel: the forced-AVX2 pass leaves it out
def test_fresh_process_peaks_stops_a_child_that_hangs():
    import psutil

    code = "import time\ntime.sleep(600)  # fresh_process_peaks_mb test"
    with pytest.raises(TimeoutError, match="did not finish"):
        helper.fresh_process_peaks_mb({"hangs": code}, timeout=6)
    time.sleep(0.5)
    left = [p for p in psutil.process_iter(["cmdline"]) if "__PEAKS__" in " ".join(p.info["cmdline"] or [])]
    assert not left  # the server and its children were stopped
