"""core/llama_cpp.py: llama.cpp, the optional runtime: whether it is there, loading the file, scoring, generating.

Scoring and generating are checked on stand-ins with llama_cpp.Llama's interface (their expected values
computed by hand); loading on the real packaged file where llama-cpp-python is installed.
"""

import math
import sys
from importlib import metadata

import numpy as np
import pytest
import torch

import helper

LLAMA_CPP = pytest.mark.skipif(not helper.llama_cpp_installed(), reason=helper.LLAMA_CPP_MISSING)


def test_llama_cpp_installed_says_whether_the_package_can_be_imported(monkeypatch):
    try:
        metadata.distribution("llama_cpp_python")
        distributed = True
    except metadata.PackageNotFoundError:
        distributed = False
    assert helper.llama_cpp_installed() is distributed
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what Python does with a package it must not import
    assert helper.llama_cpp_installed() is False
    with pytest.raises(ModuleNotFoundError, match="make setup-llama") as error:
        helper.load_llama_cpp()
    assert str(error.value) == helper.LLAMA_CPP_MISSING


@LLAMA_CPP
def test_load_llama_cpp_opens_the_packaged_file_with_its_vocabulary_and_tokenizer():
    from transformers import AutoTokenizer

    llm = helper.load_llama_cpp(n_ctx=64, threads=1)
    hidden, vocab = helper.gguf_tensor_infos()["token_embd.weight"]["shape"]  # GGUF order: row length first
    assert llm.n_vocab() == vocab == 49152 and llm.n_embd() == hidden == 576
    assert llm.n_ctx() >= 64 and llm.n_threads == 1
    assert llm.model_path == str(helper.smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(helper.smollm2_dir())
    assert llm.tokenize(b"The history of", add_bos=False) == tokenizer("The history of").input_ids
    assert helper.load_llama_cpp(n_ctx=64).n_threads == torch.get_num_threads()  # threads: torch's by default


class _NextTokenLlama:
    """Stands in for llama_cpp.Llama: after eval(tokens), scores[i] are the logits at position i, which favour
    token (tokens[i] + 1) % vocab by `confidence`; rows past the evaluated tokens hold junk."""

    def __init__(self, vocab: int = 5, confidence: float = 2.0):
        self.vocab, self.confidence, self.fed, self.scores = vocab, confidence, [], None

    def reset(self):
        self.scores = None

    def eval(self, tokens):
        assert self.scores is None, "every window starts from a reset"
        self.fed.append(list(tokens))
        scores = np.full((len(tokens) + 3, self.vocab), 99.0, dtype=np.float32)
        scores[: len(tokens)] = 0.0
        for i, token in enumerate(tokens):
            scores[i, (token + 1) % self.vocab] = self.confidence
        self.scores = scores


def test_llama_cpp_token_nll_scores_windows_that_do_not_overlap():
    llm = _NextTokenLlama(vocab=5, confidence=2.0)
    ids = [0, 1, 2, 4, 0, 1, 1, 2, 3, 0]  # the next token follows the rule except after 2 -> 4 and 1 -> 1
    nll = helper.llama_cpp_token_nll(llm, torch.tensor([ids]), n_tokens=8, window=4)
    assert llm.fed == [ids[0:4], ids[4:8]]  # each window reads its own tokens, no overlap
    log_z = math.log(math.exp(2.0) + 4)  # the softmax's normaliser: one logit of 2, four of 0
    expected = [log_z - 2.0 if b == (a + 1) % 5 else log_z for a, b in zip(ids[:8], ids[1:9])]
    assert nll.dtype == torch.float32 and nll.shape == (8,)
    torch.testing.assert_close(nll, torch.tensor(expected), rtol=0, atol=1e-6)
    for n_tokens, window, given in ((6, 4, ids), (8, 4, ids[:8]), (2, 4, ids)):
        with pytest.raises(ValueError, match="multiple of|needed"):
            helper.llama_cpp_token_nll(llm, given, n_tokens=n_tokens, window=window)


def test_llama_cpp_generate_takes_exactly_the_new_tokens_greedily():
    class Generator:
        def generate(self, tokens, temp, top_k, reset):
            self.asked = (list(tokens), temp, top_k, reset)
            token = tokens[-1]
            while True:  # llama.cpp's generate never stops by itself
                token = (3 * token + 1) % 50
                yield token

    llm = Generator()
    assert helper.llama_cpp_generate(llm, (4, 7), new_tokens=5) == [22, 17, 2, 7, 22]
    assert llm.asked == ([4, 7], 0.0, 1, True)  # greedy (temperature 0, top-1), from a fresh context
