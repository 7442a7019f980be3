"""Images: loading from a path or URL with clear errors and size limits (Lesson 2's classifier)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from quantcourse.core.config import ASSETS_DIR

__all__ = ["MAX_IMAGE_PIXELS", "MAX_DOWNLOAD_BYTES", "load_image", "asset_path"]


MAX_IMAGE_PIXELS = 50_000_000


MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024


def _read_url(url: str, timeout: float) -> bytes:
    import requests

    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            data = response.raw.read(MAX_DOWNLOAD_BYTES + 1, decode_content=True)
    except requests.RequestException as error:
        raise ConnectionError(f"Could not download image from {url} within {timeout} s: {error}") from error
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"Image at {url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def load_image(path_or_url: str | os.PathLike, timeout: float = 10.0):
    """Open a local file or an http(s) URL as an RGB PIL image, with clear errors."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(path_or_url, (str, os.PathLike)):
        raise TypeError(f"load_image expects a path or URL string, got {type(path_or_url).__name__}")
    source = str(path_or_url)
    if source.startswith(("http://", "https://")):
        data = io.BytesIO(_read_url(source, timeout))
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"No image file at {path}")
        data = path
    try:
        with Image.open(data) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"Image {source} has {image.width}x{image.height} pixels, over {MAX_IMAGE_PIXELS}")
            return image.convert("RGB")
    except UnidentifiedImageError as error:
        raise ValueError(f"{source} is not an image PIL can read") from error


def asset_path(name: str) -> Path:
    """Path of a file shipped in assets/ (raises FileNotFoundError naming what exists)."""
    path = ASSETS_DIR / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in ASSETS_DIR.iterdir()))
        raise FileNotFoundError(f"No asset {name!r}; available: {available}")
    return path
