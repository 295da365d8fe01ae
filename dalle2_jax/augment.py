"""Degradations of the upsamplers' conditioning images and aligned random crops.

Pure, jittable functions of NHWC float images in [-1, 1]. Shapes and kernel
sizes are static; strengths are drawn per example.

- `blur_augment`: Gaussian blur of random strength (first upsampler, CDM-style).
- `bsr_degrade`: a simplified BSR (Zhang et al. 2021) chain for the second
  upsampler: random blur, resize with a random interpolation, an optional
  extra down/up round trip, Gaussian noise.
- `random_crop`: the same window from a (high-res, low-res) pair.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
RESIZE_METHODS = ("nearest", "bilinear", "bicubic")


def kernel_size_for(max_sigma: float) -> int:
    """Odd kernel width covering +-3 sigma."""
    return 2 * max(int(math.ceil(3.0 * float(max_sigma))), 1) + 1


def _check_images(images, name: str = "images") -> Array:
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name}: expected (batch, height, width, channels), got shape {images.shape}")
    return images


def _per_example(values, batch: int, name: str) -> Array:
    values = jnp.asarray(values, jnp.float32)
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != batch):
        raise ValueError(f"{name}: expected a scalar or shape ({batch},), got shape {values.shape}")
    return jnp.broadcast_to(values, (batch,))


def gaussian_kernels(sigma: Array, kernel_size: int) -> Array:
    """(B, K) normalised 1-D Gaussian taps; sigma 0 gives the identity (a unit centre tap)."""
    radius = kernel_size // 2
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    sigma = jnp.maximum(sigma, 1e-6)[:, None]
    taps = jnp.exp(-0.5 * (offsets[None] / sigma) ** 2)
    return taps / jnp.sum(taps, axis=-1, keepdims=True)


def gaussian_blur(images: Array, sigma, kernel_size: int | None = None, mode: str = "reflect") -> Array:
    """Separable Gaussian blur with a per-example `sigma` (scalar or (B,)).

    kernel_size: odd static width; None derives it from a concrete sigma (+-3 sigma).
    mode: border handling of `jnp.pad` ("reflect", "symmetric", "edge", "wrap").
    """
    images = _check_images(images)
    if kernel_size is None:
        try:
            max_sigma = float(np.max(np.asarray(sigma)))
        except jax.errors.TracerArrayConversionError:
            raise ValueError("kernel_size: required when sigma is traced (under jit)") from None
        kernel_size = kernel_size_for(max_sigma)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected a positive odd int, got {kernel_size}")
    if mode not in ("reflect", "symmetric", "edge", "wrap"):
        raise ValueError(f"mode: expected 'reflect', 'symmetric', 'edge' or 'wrap', got {mode!r}")
    batch, height, width, _ = images.shape
    radius = kernel_size // 2
    if mode == "reflect" and radius >= min(height, width):
        raise ValueError(f"kernel_size: {kernel_size} is too wide for {height}x{width} images with reflect padding")
    taps = gaussian_kernels(_per_example(sigma, batch, "sigma"), kernel_size)
    dtype = images.dtype
    x = images.astype(jnp.float32)
    pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
    x = jnp.pad(x, pad, mode=mode)
    # Two 1-D passes as shifted sums: per-example kernels, no grouped convolution needed.
    x = sum(taps[:, k, None, None, None] * x[:, k:k + height] for k in range(kernel_size))
    x = sum(taps[:, k, None, None, None] * x[:, :, k:k + width] for k in range(kernel_size))
    return x.astype(dtype)


def blur_augment(rng: Array, low_res: Array, sigma_range: tuple[float, float] = (0.4, 0.6),
                 kernel_size: int | None = None) -> Array:
    """Blurs each low-resolution image with sigma ~ U(sigma_range)."""
    low_res = _check_images(low_res, "low_res")
    low, high = (float(s) for s in sigma_range)
    if not 0.0 <= low <= high:
        raise ValueError(f"sigma_range: expected 0 <= low <= high, got {sigma_range}")
    sigma = jax.random.uniform(rng, (low_res.shape[0],), minval=low, maxval=high)
    return gaussian_blur(low_res, sigma, kernel_size or kernel_size_for(high))


def _resize_random_method(rng: Array, images: Array, size: tuple[int, int]) -> Array:
    """Resizes each example with a method drawn uniformly from RESIZE_METHODS."""
    shape = (images.shape[0], size[0], size[1], images.shape[-1])
    choice = jax.random.randint(rng, (images.shape[0],), 0, len(RESIZE_METHODS))
    out = jnp.zeros(shape, jnp.float32)
    for index, method in enumerate(RESIZE_METHODS):
        resized = jax.image.resize(images.astype(jnp.float32), shape, method, antialias=True)
        out = jnp.where((choice == index)[:, None, None, None], resized, out)
    return out


def _size_pair(out_size, name: str = "out_size") -> tuple[int, int]:
    size = (out_size, out_size) if isinstance(out_size, (int, np.integer)) else tuple(out_size)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"{name}: expected a positive int or (height, width), got {out_size!r}")
    return int(size[0]), int(size[1])


def bsr_degrade(rng: Array, images: Array, out_size, *, blur_sigma_range: tuple[float, float] = (0.2, 2.0),
                blur_prob: float = 1.0, updown_prob: float = 0.5, updown_factor: int = 2,
                noise_range: tuple[float, float] = (0.0, 0.1)) -> Array:
    """BSR-style degradation of high-resolution images to (B, *out_size, C).

    Per example: blur with sigma ~ U(blur_sigma_range) (with probability
    blur_prob), resize to out_size with a random interpolation, with probability
    updown_prob go down by updown_factor and back up (random interpolations),
    add Gaussian noise with std ~ U(noise_range), clip to [-1, 1].
    """
    images = _check_images(images)
    out_h, out_w = _size_pair(out_size)
    if updown_factor < 1 or out_h % updown_factor or out_w % updown_factor:
        raise ValueError(f"updown_factor: expected a positive divisor of out_size {out_size}, got {updown_factor}")
    batch = images.shape[0]
    keys = jax.random.split(rng, 8)
    sigma = jax.random.uniform(keys[0], (batch,), minval=blur_sigma_range[0], maxval=blur_sigma_range[1])
    sigma = jnp.where(jax.random.uniform(keys[1], (batch,)) < blur_prob, sigma, 0.0)
    kernel_size = kernel_size_for(blur_sigma_range[1])
    if kernel_size // 2 >= min(images.shape[1:3]):
        raise ValueError(f"blur_sigma_range: {blur_sigma_range} is too wide for {images.shape[1:3]} images")
    x = gaussian_blur(images.astype(jnp.float32), sigma, kernel_size)
    x = _resize_random_method(keys[2], x, (out_h, out_w))
    if updown_factor > 1 and updown_prob > 0:
        small = _resize_random_method(keys[3], x, (out_h // updown_factor, out_w // updown_factor))
        round_trip = _resize_random_method(keys[4], small, (out_h, out_w))
        x = jnp.where((jax.random.uniform(keys[5], (batch,)) < updown_prob)[:, None, None, None], round_trip, x)
    noise_std = jax.random.uniform(keys[6], (batch, 1, 1, 1), minval=noise_range[0], maxval=noise_range[1])
    x = x + noise_std * jax.random.normal(keys[7], x.shape)
    return jnp.clip(x, -1.0, 1.0).astype(images.dtype)


def random_crop(rng: Array, images: Union[Array, Sequence[Array]], crop_size):
    """The same random window from each array of `images`, per example.

    images: one (B, H, W, C) array or a sequence of arrays of the same batch
    whose sizes divide the first one's (e.g. (high_res, low_res)). crop_size is
    in pixels of the first array; offsets lie on the grid of the coarsest array
    so every crop covers the same region. Returns the same structure.
    """
    single = not isinstance(images, (list, tuple))
    arrays = [_check_images(images)] if single else [_check_images(a, f"images[{i}]") for i, a in enumerate(images)]
    crop_h, crop_w = _size_pair(crop_size, "crop_size")
    batch, height, width = arrays[0].shape[:3]
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop_size: {crop_h}x{crop_w} is larger than the {height}x{width} images")
    factors = []
    for i, a in enumerate(arrays):
        if a.shape[0] != batch or height % a.shape[1] or width % a.shape[2] or \
                height // a.shape[1] != width // a.shape[2]:
            raise ValueError(f"images[{i}]: expected batch {batch} and a size dividing {height}x{width} by one "
                             f"integer factor, got shape {a.shape}")
        factors.append(height // a.shape[1])
    step = max(factors)
    if crop_h % step or crop_w % step:
        raise ValueError(f"crop_size: {crop_h}x{crop_w} must be a multiple of the largest size ratio {step}")
    key_y, key_x = jax.random.split(rng)
    top = jax.random.randint(key_y, (batch,), 0, (height - crop_h) // step + 1) * step
    left = jax.random.randint(key_x, (batch,), 0, (width - crop_w) // step + 1) * step

    def crop(array, factor):
        size = (crop_h // factor, crop_w // factor, array.shape[-1])
        one = lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0), size)
        return jax.vmap(one)(array, top // factor, left // factor)

    crops = [crop(a, f) for a, f in zip(arrays, factors)]
    return crops[0] if single else type(images)(crops)
