"""Upsampler degradations and aligned crops."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import augment
from dalle2_jax.models.unet import upsample_nearest_2x


def _images(key=0, shape=(3, 16, 16, 3)):
    return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


def test_blur_with_sigma_zero_is_identity():
    images = _images()
    np.testing.assert_array_equal(augment.gaussian_blur(images, 0.0, kernel_size=7), images)
    # Per-example sigma: only the blurred example changes.
    out = augment.gaussian_blur(images, jnp.array([0.0, 1.0, 0.0]), kernel_size=7)
    np.testing.assert_array_equal(out[0], images[0])
    np.testing.assert_array_equal(out[2], images[2])
    assert float(jnp.max(jnp.abs(out[1] - images[1]))) > 0.1


def test_blur_of_a_delta_is_the_separable_gaussian():
    delta = jnp.zeros((1, 15, 15, 1)).at[0, 7, 7, 0].set(1.0)
    sigma = 1.3
    out = np.asarray(augment.gaussian_blur(delta, sigma, kernel_size=9))[0, :, :, 0]
    taps = np.exp(-0.5 * (np.arange(-4, 5) / sigma) ** 2)
    taps /= taps.sum()
    expected = np.zeros((15, 15))
    expected[3:12, 3:12] = np.outer(taps, taps)
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_blur_preserves_the_mean():
    images = _images(1)
    sigma = jnp.array([0.5, 1.0, 2.0])
    # Periodic borders: every pixel's mass is redistributed inside the image.
    wrapped = augment.gaussian_blur(images, sigma, kernel_size=13, mode="wrap")
    np.testing.assert_allclose(wrapped.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1e-6)
    # Reflected borders: exact for constant images, close for random ones.
    constant = jnp.full((3, 16, 16, 3), 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(constant, sigma, kernel_size=13), constant, atol=1e-6)
    reflected = augment.gaussian_blur(images, sigma, kernel_size=13)
    np.testing.assert_allclose(reflected.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=0.02)
    assert float(reflected.std()) < float(images.std())


def test_blur_kernel_size_rules():
    images = _images()
    assert augment.kernel_size_for(0.6) == 5 and augment.kernel_size_for(2.0) == 13
    with pytest.raises(ValueError, match="kernel_size"):
        jax.jit(augment.gaussian_blur)(images, jnp.ones(3))
    with pytest.raises(ValueError, match="kernel_size"):
        augment.gaussian_blur(images, 1.0, kernel_size=4)
    with pytest.raises(ValueError, match="sigma"):
        augment.gaussian_blur(images, jnp.ones(2), kernel_size=5)
    with pytest.raises(ValueError, match="images"):
        augment.gaussian_blur(images[0], 1.0, kernel_size=5)


def test_blur_augment_draws_sigma_in_range():
    images = _images(2)
    out = augment.blur_augment(jax.random.key(0), images, sigma_range=(0.8, 0.8), kernel_size=7)
    np.testing.assert_allclose(out, augment.gaussian_blur(images, 0.8, kernel_size=7), atol=1e-6)
    a = augment.blur_augment(jax.random.key(1), images)
    np.testing.assert_array_equal(a, augment.blur_augment(jax.random.key(1), images))
    # sigma in [0.4, 0.6]: between the two extreme blurs, example by example.
    low = augment.gaussian_blur(images, 0.4, kernel_size=5)
    high = augment.gaussian_blur(images, 0.6, kernel_size=5)
    dist = lambda u, v: jnp.sqrt(jnp.sum((u - v) ** 2, axis=(1, 2, 3)))
    assert bool(jnp.all(dist(a, images) >= dist(low, images) - 1e-5))
    assert bool(jnp.all(dist(a, images) <= dist(high, images) + 1e-5))


def test_bsr_degrade_shapes_range_and_determinism():
    images = _images(3, (4, 32, 32, 3))
    degrade = jax.jit(augment.bsr_degrade, static_argnums=2)
    out = degrade(jax.random.key(0), images, 8)
    assert out.shape == (4, 8, 8, 3) and out.dtype == images.dtype
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, degrade(jax.random.key(0), images, 8))
    assert float(jnp.max(jnp.abs(out - degrade(jax.random.key(1), images, 8)))) > 1e-3
    assert augment.bsr_degrade(jax.random.key(0), images, (16, 8)).shape == (4, 16, 8, 3)
    # Without blur, noise or round trip a constant image stays constant whatever the interpolation.
    constant = jnp.full((4, 32, 32, 3), -0.25)
    clean = augment.bsr_degrade(jax.random.key(2), constant, 16, blur_sigma_range=(0.0, 0.0), updown_prob=0.0,
                                noise_range=(0.0, 0.0))
    np.testing.assert_allclose(clean, jnp.full((4, 16, 16, 3), -0.25), atol=1e-6)
    # The noise level is what the range says: residual std of a constant image.
    noisy = augment.bsr_degrade(jax.random.key(3), constant, 16, blur_sigma_range=(0.0, 0.0), updown_prob=0.0,
                                noise_range=(0.05, 0.05))
    np.testing.assert_allclose(jnp.std(noisy - constant[:, :16, :16]), 0.05, rtol=0.1)
    with pytest.raises(ValueError, match="out_size"):
        augment.bsr_degrade(jax.random.key(0), images, 0)


def test_random_crop_aligns_high_and_low_resolution():
    low = _images(4, (6, 8, 8, 3))
    high = upsample_nearest_2x(upsample_nearest_2x(low))  # 32x32, each low pixel a 4x4 block
    crop = jax.jit(augment.random_crop, static_argnums=2)
    high_crop, low_crop = crop(jax.random.key(0), (high, low), 16)
    assert high_crop.shape == (6, 16, 16, 3) and low_crop.shape == (6, 4, 4, 3)
    np.testing.assert_array_equal(high_crop, upsample_nearest_2x(upsample_nearest_2x(low_crop)))
    # Offsets differ between examples and are valid windows of the original.
    hc = np.asarray(high_crop)
    h = np.asarray(high)
    found = []
    for b in range(6):
        hits = [(y, x) for y in range(0, 17, 4) for x in range(0, 17, 4)
                if np.array_equal(h[b, y:y + 16, x:x + 16], hc[b])]
        assert hits
        found.append(hits[0])
    assert len(set(found)) > 1
    single = augment.random_crop(jax.random.key(0), high, (8, 12))
    assert single.shape == (6, 8, 12, 3)
    with pytest.raises(ValueError, match="crop_size"):
        augment.random_crop(jax.random.key(0), (high, low), 18)  # not on the low-res grid
    with pytest.raises(ValueError, match="crop_size"):
        augment.random_crop(jax.random.key(0), high, 40)
