"""Checking and converting what users pass to the pipeline: seeds, counts, captions, images, masks."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

_NOISE_STREAMS = {"decoder": 1, "upsampler": 2, "interpolate": 3, "inpaint": 4}

def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    return int(seed)


def check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_scale(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def check_prompts(prompts, name: str = "prompts") -> list[str]:
    """A caption or a non-empty list of non-empty captions -> list[str]."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise ValueError(f"{name}: expected a caption or a list of captions, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{name}: expected at least one caption, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"{name}[{i}]: expected a non-empty caption, got {prompt!r}")
    return list(prompts)


def check_caption(caption, name: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{name}: expected a non-empty caption string, got {caption!r}")
    return caption


def _open_image(path, name: str, mode: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no image file {os.fspath(path)!r}")
    try:
        with Image.open(path) as image:
            if mode == "RGB" and image.mode in ("RGBA", "LA", "P"):
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image.convert("RGBA"))
            return np.asarray(image.convert(mode))
    except OSError as error:
        raise ValueError(f"{name}: {os.fspath(path)!r} is not a readable image ({error})") from None


def load_images(images, name: str = "images") -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays from an array (H, W, 3) / (N, H, W, 3), a PIL image, a path, or a list of those."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{name}: expected at least one image, got an empty list")
        return [image for i, item in enumerate(images) for image in load_images(item, f"{name}[{i}]")]
    if isinstance(images, (str, os.PathLike)):
        return [_open_image(images, name, "RGB")]
    if isinstance(images, Image.Image):
        return [np.asarray(images.convert("RGB"))]
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise ValueError(f"{name}: expected a uint8 array, a PIL image or a path, got {type(images).__name__}")
    array = np.asarray(images)
    if array.ndim not in (3, 4):
        raise ValueError(f"{name}: expected rank 3 (H, W, 3) or 4 (N, H, W, 3), got shape {array.shape}")
    if array.shape[-1] != 3:
        raise ValueError(f"{name}: expected 3 (RGB) channels in the last axis, got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name}: expected non-empty images, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8 in [0, 255], got {array.dtype}")
    return list(array[None] if array.ndim == 3 else array)


def one_image(image, name: str) -> np.ndarray:
    images = load_images(image, name)
    if len(images) != 1:
        raise ValueError(f"{name}: expected one image, got {len(images)}")
    return images[0]


def load_mask(mask, name: str, image_shape: tuple[int, int]) -> np.ndarray:
    """bool (H, W), True where the image is replaced: from a bool or uint8 (nonzero) array, a PIL image or a path."""
    if isinstance(mask, (str, os.PathLike)):
        array = _open_image(mask, name, "L")
    elif isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L"))
    elif hasattr(mask, "shape") and hasattr(mask, "dtype"):
        array = np.asarray(mask)
        if array.dtype not in (np.bool_, np.uint8):
            raise ValueError(f"{name}: expected a bool or uint8 array (True / nonzero = replace), got {array.dtype}")
    else:
        raise ValueError(f"{name}: expected a bool/uint8 array, a PIL image or a path, got {type(mask).__name__}")
    if array.shape != tuple(image_shape):
        raise ValueError(f"{name}: expected shape {tuple(image_shape)} (the image's height and width), "
                         f"got {array.shape}")
    return array.astype(bool)


def _centre_square(array: np.ndarray) -> np.ndarray:
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return np.ascontiguousarray(array[top:top + side, left:left + side])


def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3): the centre square, bicubic-resized (as the training data pipeline)."""
    image = _centre_square(image)
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool (size, size): the centre square; a pixel is replaced if any part of it is."""
    mask = _centre_square(mask)
    if mask.shape[0] == size:
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) > 0


def to_float(images_uint8) -> np.ndarray:
    return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def slerp(a, b, theta) -> np.ndarray:
    """Spherical interpolation of the rows of a and b (any trailing shape) at fractions theta (T,)
    -> (T, *a.shape); linear where the two are (anti)parallel."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    theta = np.asarray(theta, np.float64).reshape(-1, *([1] * a.ndim))
    flat_a, flat_b = a.ravel(), b.ravel()
    cos = np.dot(flat_a, flat_b) / max(np.linalg.norm(flat_a) * np.linalg.norm(flat_b), 1e-12)
    omega = math.acos(min(1.0, max(-1.0, cos)))
    if math.sin(omega) < 1e-6:
        return ((1.0 - theta) * a + theta * b).astype(np.float32)
    return ((np.sin((1.0 - theta) * omega) * a + np.sin(theta * omega) * b) / math.sin(omega)).astype(np.float32)


def bucket(count: int) -> int:
    """CLIP and the prior run on batches padded to a power of two (at least 2), so that a few
    compiled programs serve every batch size."""
    return max(2, 1 << (count - 1).bit_length())


def pad_rows(array, rows: int) -> np.ndarray:
    """`array` with its last row repeated up to `rows` rows."""
    array = np.asarray(array)
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


def initial_noise(seed: int, purpose: str, shape: tuple[int, ...], index: int = 0) -> np.ndarray:
    """Standard normal initial noise from PCG64(seed, purpose, index): row i is the same whatever the rows after it."""
    rng = np.random.Generator(np.random.PCG64([seed, _NOISE_STREAMS[purpose], index]))
    return rng.standard_normal(shape, dtype=np.float32)

