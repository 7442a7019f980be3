"""Core helper behaviour: the course's DummyModel, dtype printing, seeding, images."""

import pytest
import torch

import helper


def test_setup_notebook_seeds_torch_and_numpy():
    import gc

    import numpy as np

    try:
        helper.setup_notebook(seed=7)
        first = (torch.rand(3), np.random.rand(3))
        helper.setup_notebook(seed=7)
        assert torch.equal(first[0], torch.rand(3)) and np.array_equal(first[1], np.random.rand(3))
    finally:
        gc.unfreeze()  # setup_notebook froze this test session's objects: collectable again


def test_setup_notebook_freezes_what_exists_and_still_collects_what_comes_later():
    import gc
    import weakref

    class Node:
        pass

    try:
        helper.setup_notebook()
        assert gc.get_freeze_count() > 0
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle created after the freeze
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        assert alive() is None  # collected as usual
    finally:
        gc.unfreeze()  # the rest of the test session as before


def test_versions_reports_what_is_installed(monkeypatch):
    from importlib import metadata

    found = helper.versions()
    assert found and all(found[name] == metadata.version(name) for name in found)
    real = metadata.version
    monkeypatch.setattr(
        metadata,
        "version",
        lambda name: real(name) if name != "torchao" else (_ for _ in ()).throw(metadata.PackageNotFoundError(name)),
    )
    assert helper.versions()["torchao"] == "not installed"


def test_every_shipped_photo_loads_as_rgb():
    photos = [p for p in helper.ASSETS_DIR.glob("*.jpg")]
    assert len(photos) >= 5
    for path in photos:
        image = helper.load_image(path)
        assert image.mode == "RGB" and min(image.size) >= 224


def test_preprocess_image_gives_a_normalised_batch():
    batch = helper.preprocess_image(helper.load_image(helper.asset_path("coffee.jpg")))
    assert batch.shape == (1, 3, 224, 224) and batch.dtype == torch.float32
    assert -3 < batch.min() < 0 < batch.max() < 3


def test_asset_path_lists_what_exists():
    with pytest.raises(FileNotFoundError, match="chelsea_cat.jpg"):
        helper.asset_path("dog.jpg")


def test_imagenet_classes_has_1000_names_in_model_order():
    names = helper.imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[281] == "tabby"


def test_get_generation_rejects_other_inputs():
    with pytest.raises(TypeError, match="PIL image or a str"):
        helper.get_generation(None, None, 42)


def test_load_image_refuses_absurdly_large_images(tmp_path):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (8000, 8000)).save(path)  # 64 M pixels, a few kB on disk
    with pytest.raises(ValueError, match="pixels"):
        helper.load_image(path)


def test_building_a_dummy_model_leaves_the_global_generator_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    helper.DummyModel()
    assert torch.equal(torch.rand(3), expected)
    logits = helper.DummyModel()(torch.tensor([[1, 0]]))[0, 0]
    assert torch.allclose(logits, torch.tensor([-0.6872, 0.7132]), atol=1e-4)


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
