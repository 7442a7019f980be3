"""The course's one timing protocol: interleaved rounds, medians, spreads and verdicts."""

import pytest
import torch

import helper


def test_rounds_are_interleaved_after_warmup():
    calls = []
    times = helper.time_variants({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert {name: len(s) for name, s in times.items()} == {"a": 3, "b": 3}


def test_speedup_uses_paired_rounds():
    times = {"base": [2.0, 4.0, 3.0], "fast": [1.0, 1.0, 1.5]}
    assert helper.speedup(times, "fast", "base") == (2.0, 2.0, 4.0)


@pytest.mark.parametrize(
    "fast, expected",
    [
        ([1.0, 1.0, 1.0], "2.00x faster than base (spread 2.00–2.00)"),
        ([4.0, 4.0, 5.0], "2.00x slower than base (spread 0.40–0.50)"),
        ([1.9, 2.1, 2.0], "about as fast as base (spread 0.95–1.05)"),
    ],
)
def test_speed_verdict_names_a_direction_only_when_every_round_agrees(fast, expected):
    assert helper.speed_verdict({"base": [2.0, 2.0, 2.0], "v": fast}, "v", "base") == expected


def test_format_rate():
    assert helper.format_rate(32, [2.0, 1.0, 4.0], "tokens/s") == "16.0 tokens/s (spread 8.0–32.0)"


def test_bad_input_is_refused():
    with pytest.raises(TypeError):
        helper.time_variants({})
    with pytest.raises(TypeError):
        helper.time_variants({"a": 3})
    with pytest.raises(ValueError):
        helper.time_variants({"a": lambda: None}, repeats=0)
    with pytest.raises(KeyError):
        helper.speedup({"a": [1.0]}, "b", "a")


def test_sanitizer_blanks_exactly_the_protocol_formats():
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(helper.REPO_DIR / "tests" / "nbval_sanitize.cfg")

    def sanitize(text):
        for section in cfg.sections():
            text = re.sub(cfg[section]["regex"], cfg[section]["replace"], text)
        return text

    a = "decode bf16 17.0 tokens/s (spread 16.5–17.3)  1.31x faster than fp32 (spread 1.25–1.40)"
    b = "decode bf16 9.1 tokens/s (spread 8.0–10.3)  about as fast as fp32 (spread 0.90–1.10)"
    assert sanitize(a) == sanitize(b)
    assert sanitize("perplexity 14.81") == "perplexity 14.81"  # numbers without a unit stay checked


def test_decode_timings_refuses_what_it_cannot_run():
    class Tok:
        def __call__(self, text, return_tensors="pt"):
            return {"input_ids": [[1, 2]]}

    with pytest.raises(TypeError, match="neither a transformers nor a llama.cpp model"):
        helper.decode_timings({"mystery": object()}, Tok())


def test_decode_timings_warms_up_short_then_times_interleaved_rounds():
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def generate(self, input_ids, max_new_tokens, min_new_tokens, do_sample):
            assert max_new_tokens == min_new_tokens and not do_sample
            calls.append((self.name, max_new_tokens))

    class Tok:
        def __call__(self, text, return_tensors="pt"):
            return {"input_ids": torch.tensor([[1, 2]])}

    times = helper.decode_timings({"a": Recorder("a"), "b": Recorder("b")}, Tok(), new_tokens=16, repeats=3)
    assert calls == [("a", 2), ("b", 2)] + [("a", 16), ("b", 16)] * 3  # one short warm-up each, then rounds
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    calls.clear()
    helper.decode_timings({"a": Recorder("a")}, Tok(), new_tokens=1, repeats=1)
    assert calls == [("a", 1), ("a", 1)]  # the warm-up never generates more than a round
    with pytest.raises(ValueError, match="warmup_tokens"):
        helper.decode_timings({"a": Recorder("a")}, Tok(), warmup_tokens=0)
