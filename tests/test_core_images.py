"""core/images.py: images from a path or a URL, with clear errors and size limits."""

import functools
import http.server
import threading
import time

import pytest

import helper
from quantcourse.core import images


def test_every_shipped_photo_loads_as_rgb():
    photos = [p for p in helper.ASSETS_DIR.glob("*.jpg")]
    assert len(photos) >= 5
    for path in photos:
        image = helper.load_image(path)
        assert image.mode == "RGB" and min(image.size) >= 224


def test_asset_path_lists_what_exists():
    with pytest.raises(FileNotFoundError, match="chelsea_cat.jpg"):
        helper.asset_path("dog.jpg")


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


def test_load_image_refuses_absurdly_large_images(tmp_path):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (8000, 8000)).save(path)  # 64 M pixels, a few kB on disk
    with pytest.raises(ValueError, match="pixels"):
        helper.load_image(path)


def test_the_pixel_limit_is_inclusive(tmp_path, monkeypatch):
    """An image of exactly MAX_IMAGE_PIXELS loads, one pixel more is refused (on a limit lowered to 100)."""
    from PIL import Image

    assert helper.MAX_IMAGE_PIXELS == images.MAX_IMAGE_PIXELS  # the facade's name is the module's value
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (10, 10), (200, 10, 10)).save(tmp_path / "at.png")
    Image.new("RGB", (101, 1)).save(tmp_path / "over.png")
    assert helper.load_image(tmp_path / "at.png").getpixel((3, 4)) == (200, 10, 10)
    with pytest.raises(ValueError, match="101x1 pixels, over 100"):
        helper.load_image(tmp_path / "over.png")


@pytest.fixture
def local_server(monkeypatch):
    """An HTTP server on 127.0.0.1 that serves assets/ (no network needed): its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set in the environment must not see these requests
    handler = functools.partial(Quiet, directory=str(helper.ASSETS_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_image_from_a_url_gives_the_files_pixels_and_refuses_a_download_over_the_limit(local_server, monkeypatch):
    local = helper.load_image(helper.asset_path("coffee.jpg"))
    downloaded = helper.load_image(f"{local_server}/coffee.jpg", timeout=5.0)
    assert downloaded.size == local.size and downloaded.tobytes() == local.tobytes()
    with pytest.raises(ConnectionError, match="404"):
        helper.load_image(f"{local_server}/missing.jpg", timeout=5.0)
    size = helper.asset_path("coffee.jpg").stat().st_size
    assert helper.MAX_DOWNLOAD_BYTES > size  # the real limit lets a photo through
    monkeypatch.setattr(images, "MAX_DOWNLOAD_BYTES", size - 1)
    with pytest.raises(ValueError, match=f"larger than {size - 1} bytes"):
        helper.load_image(f"{local_server}/coffee.jpg", timeout=5.0)
    monkeypatch.setattr(images, "MAX_DOWNLOAD_BYTES", size)  # exactly the file's size is allowed
    assert helper.load_image(f"{local_server}/coffee.jpg", timeout=5.0).tobytes() == local.tobytes()
