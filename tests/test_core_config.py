"""core/config.py: the cache folder, the Hub switch, seeding, installed versions and their check."""

from pathlib import Path

import pytest
import torch

import helper


@pytest.fixture(autouse=True)
def _no_claims_log(monkeypatch):
    """check_versions claims: keep these tests' claims out of a claims log set for a test pass."""
    monkeypatch.delenv(helper.CLAIMS_LOG, raising=False)


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

    import accelerate
    import bitsandbytes
    import transformers

    found = helper.versions()
    # the libraries the lessons' numbers depend on, as requirements.txt lists them first
    assert set(found) == {"torch", "transformers", "optimum-quanto", "torchao", "bitsandbytes", "accelerate", "gguf"}
    # the versions the imported modules report themselves, not read from the same metadata
    assert found["torch"] == torch.__version__ and found["transformers"] == transformers.__version__
    assert found["bitsandbytes"] == bitsandbytes.__version__ and found["accelerate"] == accelerate.__version__
    real = metadata.version
    monkeypatch.setattr(
        metadata,
        "version",
        lambda name: real(name) if name != "torchao" else (_ for _ in ()).throw(metadata.PackageNotFoundError(name)),
    )
    assert helper.versions()["torchao"] == "not installed"


def test_hub_switch_parsing(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv(helper.HUB_SWITCH, value)
        assert helper.use_hub() is expected
    monkeypatch.delenv(helper.HUB_SWITCH)
    assert helper.use_hub() is False


def test_missing_package_names_the_fix():
    with pytest.raises(ModuleNotFoundError, match="make setup"):
        helper.package_dir("no_such_course_package")


def test_cache_dir_is_made_where_asked_and_defaults_to_the_ignored_cache(tmp_path, monkeypatch):
    wanted = tmp_path / "not" / "there" / "yet"
    monkeypatch.setenv("QUANT_COURSE_CACHE", str(wanted))
    assert helper.cache_dir() == wanted and wanted.is_dir()
    monkeypatch.delenv("QUANT_COURSE_CACHE")
    default = helper.cache_dir()
    assert default == Path(__file__).resolve().parents[1] / ".cache" and default.is_dir()
    ignored = (default.parent / ".gitignore").read_text().splitlines()
    assert ".cache/" in ignored or ".cache" in ignored  # converted models are never committed


def test_check_versions_flags_a_library_outside_its_range(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch==0.0.1  # impossible pin\n")
    with pytest.raises(AssertionError, match="torch"):
        helper.check_versions(reqs)
    helper.check_versions()  # the repo's own ranges hold in the test environment
