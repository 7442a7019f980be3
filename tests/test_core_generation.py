"""core/generation.py: greedy generation from an image or a prompt, and a second handle with other settings."""

import copy

import pytest
import torch
from torch import nn

import helper
from quantcourse.core import generation


def test_get_generation_rejects_other_inputs():
    with pytest.raises(TypeError, match="PIL image or a str"):
        helper.get_generation(None, None, 42)


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


def test_with_generation_config_shares_weights_not_settings(tiny_llama):
    llama, _ = tiny_llama  # conftest.py's (model, ids)
    static = helper.with_generation_config(llama, cache_implementation="static")
    assert static.generation_config.cache_implementation == "static"
    assert llama.generation_config.cache_implementation != "static"
    assert static.lm_head.weight is llama.lm_head.weight
    ids = torch.randint(0, 96, (1, 5))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(static.generate(ids, **kwargs), llama.generate(ids, **kwargs))
    with pytest.raises(ValueError, match="no setting"):
        helper.with_generation_config(llama, cache_kind="static")
    with pytest.raises(TypeError, match="generation_config"):
        helper.with_generation_config(nn.Linear(2, 2))
