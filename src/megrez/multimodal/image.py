"""Images: reading (Pillow, any format it knows, EXIF orientation applied) and the
MiniCPM-V / LLaVA-UHD slicing scheme that Megrez-3B-Omni uses.

A small image (area <= scale_resolution^2) becomes one crop resized to about that area; a
larger one becomes a downscaled "source" crop plus up to ``max_slice_nums`` slices of a grid
chosen to match its aspect ratio, read row-major (top row first, left to right). Every
crop's sides are multiples of the patch size. Crops are raw 0-255 RGB values: the model
normalises them.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import MediaError

MAX_PIXELS = 8192 * 8192  # refuse decompression bombs before decoding them


def _pil():
    try:
        from PIL import Image, ImageOps
    except ModuleNotFoundError:
        raise MediaError("images need Pillow: pip install 'megrez[omni]'") from None
    return Image, ImageOps


def decode_data_url(url: str, where: str, kind: str = "image") -> bytes:
    """The bytes of a ``data:<mime>;base64,<payload>`` URL."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise MediaError(f"{where}: expected a data URL of the form 'data:{kind}/<format>;base64,<data>'")
    return decode_base64(payload, where)


def decode_base64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: the base64 data is not valid") from None


def load_image(source, where: str = "image"):
    """A PIL RGB image from a path, bytes, a data URL or a PIL image; EXIF orientation applied."""
    Image, ImageOps = _pil()
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, str) and source.startswith("data:"):
            source = decode_data_url(source, where)
        if isinstance(source, (bytes, bytearray)):
            data, name = io.BytesIO(source), "the image data"
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source).expanduser()
            if not path.is_file():
                raise MediaError(f"{where}: image file {str(path)!r} not found")
            data, name = path, repr(str(path))
        else:
            raise MediaError(f"{where}: expected an image path, bytes or a PIL image, got {type(source).__name__}")
        try:
            img = Image.open(data)
            if img.width * img.height > MAX_PIXELS:
                raise MediaError(f"{where}: image of {img.width}x{img.height} pixels is larger than the limit "
                                 f"of {MAX_PIXELS} pixels")
            img.load()
        except MediaError:
            raise
        except Image.DecompressionBombError:
            raise MediaError(f"{where}: image is larger than the limit of {MAX_PIXELS} pixels") from None
        except Exception as e:  # UnidentifiedImageError, truncated files, OSError from decoders
            raise MediaError(f"{where}: {name} is not a readable image ({type(e).__name__}: {e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block: keep the pixels as stored
    if img.width < 1 or img.height < 1:
        raise MediaError(f"{where}: the image is empty")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------- slicing

def ensure_divide(length: float, patch: int) -> int:
    return max(round(length / patch) * patch, patch)


def find_best_resize(size: tuple[float, float], scale: int, patch: int, allow_upscale: bool = False):
    w, h = size
    if w * h > scale * scale or allow_upscale:
        r = w / h
        h = int(scale / math.sqrt(r))
        w = int(h * r)
    return ensure_divide(w, patch), ensure_divide(h, patch)


def get_refine_size(size, grid, scale: int, patch: int, allow_upscale: bool = False):
    w, h = size
    cols, rows = grid
    cell = find_best_resize((ensure_divide(w, cols) / cols, ensure_divide(h, rows) / rows), scale, patch,
                            allow_upscale)
    return cell[0] * cols, cell[1] * rows


def best_grid(size, scale: int, max_slices: int) -> list[int] | None:
    """[cols, rows] of the slice grid, or None when the image is not sliced."""
    w, h = size
    multiple = min(math.ceil(w * h / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    log_ratio = math.log(w / h)
    grids = []
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        grids += [[m, n // m] for m in range(1, n + 1) if n % m == 0]
    best, error = [1, 1], float("inf")
    for g in grids:  # the first minimum wins
        e = abs(log_ratio - math.log(g[0] / g[1]))
        if e < error:
            best, error = g, e
    return best


@dataclass
class ImageCrops:
    crops: list[torch.Tensor]       # uint8 [3, H, W]: the source crop first, then the slices row-major
    grid: list[int] | None          # [cols, rows] of the slices, None when there are none
    size: tuple[int, int]           # the image's (width, height)


def slice_image(img, scale: int = 448, max_slices: int = 9, patch: int = 14) -> ImageCrops:
    Image, _ = _pil()
    bicubic = Image.Resampling.BICUBIC
    size = img.size
    grid = best_grid(size, scale, max_slices)
    if grid is None:
        crops = [img.resize(find_best_resize(size, scale, patch, allow_upscale=True), bicubic)]
    else:
        crops = [img.resize(find_best_resize(size, scale, patch), bicubic)]
        refine = img.resize(get_refine_size(size, grid, scale, patch, allow_upscale=True), bicubic)
        cw, ch = refine.width // grid[0], refine.height // grid[1]
        for top in range(0, refine.height, ch):
            for left in range(0, refine.width, cw):
                crops.append(refine.crop((left, top, left + cw, top + ch)))
    return ImageCrops([to_tensor(c) for c in crops], grid, size)


def to_tensor(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


__all__ = ["ImageCrops", "load_image", "slice_image", "best_grid", "find_best_resize", "get_refine_size",
           "decode_data_url", "decode_base64"]
