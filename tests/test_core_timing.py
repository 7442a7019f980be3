"""core/timing.py: the course's one timing protocol: interleaved rounds, medians, spreads and verdicts."""

from types import SimpleNamespace

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


def test_speedup_refuses_unpaired_rounds():
    with pytest.raises(ValueError, match="same"):
        helper.speedup({"a": [1.0, 2.0], "b": [1.0]}, "b", "a")


@pytest.mark.parametrize(
    "fast, expected",
    [
        ([1.0, 1.0, 1.0], "2.00x faster than base (spread 2.00–2.00)"),
        ([4.0, 4.0, 5.0], "2.00x slower than base (spread 2.00–2.50)"),
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


def test_the_lessons_decode_with_decode_tokens_in_timing_repeats_rounds_by_default(capsys):
    """What the lessons call with no arguments: DECODE_TOKENS new tokens per round, TIMING_REPEATS rounds."""
    calls = []

    class Recorder(torch.nn.Module):
        def generate(self, input_ids, max_new_tokens, min_new_tokens, do_sample):
            calls.append(max_new_tokens)

    class Tok:
        def __call__(self, text, return_tensors="pt"):
            return {"input_ids": torch.tensor([[1, 2]])}

    times = helper.decode_timings({"a": Recorder()}, Tok())
    assert calls == [2] + [helper.DECODE_TOKENS] * helper.TIMING_REPEATS  # a short warm-up, then the rounds
    assert len(helper.time_variants({"a": lambda: None})["a"]) == helper.TIMING_REPEATS == len(times["a"])
    helper.print_decode_speeds({"fp32": [2.0, 2.0, 2.0], "bf16": [0.5, 0.5, 0.5]}, "fp32")
    rate = helper.DECODE_TOKENS / 0.5  # the default work per round is DECODE_TOKENS tokens
    assert f"decode bf16 {rate:.1f} tokens/s (spread {rate:.1f}–{rate:.1f})" in capsys.readouterr().out


def test_decode_timings_gives_a_llama_cpp_model_the_prompts_token_ids():
    class LlamaLike:  # what decode_timings recognises as llama_cpp.Llama: generate and n_ctx
        n_ctx = 64

        def __init__(self):
            self.prompts = []

        def generate(self, tokens, temp, top_k, reset):
            self.prompts.append(list(tokens))
            while True:
                yield 0

    class Tok:
        def __call__(self, text, return_tensors="pt"):
            assert text == "The history of"
            return SimpleNamespace(input_ids=torch.tensor([[504, 1463, 282]]))

    llm = LlamaLike()
    times = helper.decode_timings({"llama.cpp": llm}, Tok(), new_tokens=3, repeats=2)
    assert llm.prompts == [[504, 1463, 282]] * 3 and len(times["llama.cpp"]) == 2  # a warm-up and 2 rounds


def test_one_thread_runs_torch_on_one_thread_and_restores_the_count():
    import re

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with helper.one_thread():
            assert torch.get_num_threads() == 1
            info = torch.__config__.parallel_info()  # what ATen's OpenMP backend itself reports
            assert re.search(r"omp_get_max_threads\(\) : 1\b", info) or "OpenMP" not in info
        assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError), helper.one_thread():
            raise ZeroDivisionError
        assert torch.get_num_threads() == 2  # restored when the block raises too
    finally:
        torch.set_num_threads(before)
