"""The upsampler stage: aligned crops of (high-res, upsampled degraded low-res) pairs, training
on crops through `dalle2-jax train upsampler` on 8 devices, full-size sampling and its PSNR."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle2_jax import augment, config_util, sharding
from dalle2_jax.tasks import decoder
from dalle2_jax.tasks import upsampler
from dalle2_jax.training import entry, metrics

SHAPES_SIZES = dict(image_size=32, seed=0, num_train=48, num_test=16, num_test_unseen=8)
UNET = {"image_size": 32, "model_channels": 16, "channel_mult": "(1,)", "num_res_blocks": 1, "num_groups": 8}
STEPS, EVAL_IMAGES = 2, 4


def upsampler_overrides(data_dir: str, **extra) -> list[str]:
    values = {f"model.{k}": v for k, v in UNET.items()}
    values.update({f"data.{k}": v for k, v in SHAPES_SIZES.items()})
    values.update({"low_res_size": 16, "data.data_dir": data_dir, "total_steps": STEPS, "batch_size": 8,
                   "log_every": 1, "eval_every": STEPS, "checkpoint_every": 0, "progress_bar": False,
                   "eval.num_images": EVAL_IMAGES, "eval.sampling_steps": 2})
    values.update(extra)
    return [f"--config.{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def task(data_dir):
    # The blur of the paper's first upsampler (tiny trains on the clean low-res image).
    return upsampler.make_task(config_util.load_config("configs/upsampler.py:tiny",
                                                       upsampler_overrides(data_dir, degradation="blur")))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir, devices8):
    workdir = str(tmp_path_factory.mktemp("runs") / "upsampler")
    state = entry.run_train("upsampler", "configs/upsampler.py:tiny", workdir, upsampler_overrides(data_dir))
    return workdir, jax.device_get(state)


def test_training_pairs_are_aligned_crops_of_the_upsampled_degraded_image(task):
    assert task.crop_size == 16 and task.grid == 2  # a quarter of the area; low-res pixels are 2x2
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3)), jnp.float32)
    key = jax.random.key(3)
    high, low_up = jax.jit(task.training_pair)(key, images)
    assert high.shape == low_up.shape == (6, 16, 16, 3)
    degrade_key, _ = jax.random.split(key)

    @jax.jit
    def whole(images):  # the whole conditioning image: block mean, blur of sigma in [0.4, 0.6], bicubic up
        low_res = task.low_res_images(images)
        return task.upsampled(augment.blur_augment(degrade_key, low_res, (0.4, 0.6))), task.upsampled(low_res)

    full, unblurred = whole(images)
    offsets = set()
    for i in range(6):
        (top, left), = [(y, x) for y in range(17) for x in range(17)
                        if np.array_equal(images[i, y:y + 16, x:x + 16], high[i])]
        offsets.add((top, left))
        assert top % 2 == 0 and left % 2 == 0
        np.testing.assert_allclose(low_up[i], full[i, top:top + 16, left:left + 16], atol=1e-5)
    assert len(offsets) > 1
    assert float(jnp.mean(jnp.abs(full - unblurred))) > 1e-3  # the blur did something


def test_bsr_degradation_and_noise_level_conditioning(data_dir):
    config = config_util.load_config("configs/upsampler.py:tiny", upsampler_overrides(
        data_dir, degradation="bsr", **{"model.use_noise_level": True, "augment.max_noise_level": 100}))
    task = upsampler.make_task(config)
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    # bsr_degrade itself is augment's (and tested there); here only its place in the chain.
    low = jax.eval_shape(task.degrade, jax.random.key(0), images)
    assert low.shape == (4, 16, 16, 3)
    low_up = task.upsampled(task.low_res_images(images))
    kwargs = jax.jit(task._unet_kwargs, static_argnums=2)(jax.random.key(1), low_up, 4)
    levels = np.asarray(kwargs["noise_level"])
    assert levels.shape == (4,) and levels.min() >= 0 and levels.max() <= 100
    alpha_bar = np.asarray(task.schedule.alphas_cumprod)[levels][:, None, None, None]
    noise = (np.asarray(kwargs["low_res"]) - np.sqrt(alpha_bar) * np.asarray(low_up)) / np.sqrt(1 - alpha_bar)
    assert abs(noise.std() - 1) < 0.1 and abs(noise.mean()) < 0.1  # q_sample of the level drawn


def test_trained_on_crops_it_samples_full_size_images(run, task):
    workdir, state = run
    records = metrics.read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2] and all(np.isfinite(r["loss"]) for r in train_records)
    assert state.params["conv_in"]["kernel"].shape == (3, 3, 6, 16)  # noisy image + low-res image
    (evaluation,) = [r for r in records if "eval/psnr" in r]

    truth = decoder.to_float(task.eval_images())
    low_res = np.asarray(task.low_res_images(jnp.asarray(truth)))
    params = jax.device_put(state.ema_params, sharding.replicated(sharding.make_mesh()))
    samples = task.sample(params, low_res, rng=jax.random.key(0))
    assert samples.shape == (EVAL_IMAGES, 32, 32, 3)  # trained on 16px crops, sampled at 32px
    assert evaluation["eval/psnr"] == pytest.approx(np.mean(upsampler.psnr(samples, truth)), rel=1e-6)
    bicubic = np.clip(jax.image.resize(low_res, truth.shape, "bicubic"), -1, 1)
    assert evaluation["eval/bicubic_psnr"] == pytest.approx(np.mean(upsampler.psnr(bicubic, truth)), rel=1e-6)
    assert evaluation["eval/bicubic_psnr"] > 20  # smooth synthetic shapes: bicubic is already close

    grid = np.asarray(Image.open(os.path.join(workdir, "samples", f"step_{STEPS}.png")))
    assert grid.shape == (EVAL_IMAGES * 32, 3 * 32, 3)  # rows: low-res input, sample, ground truth
    rows = grid.reshape(EVAL_IMAGES, 32, 3, 32, 3).transpose(0, 2, 1, 3, 4)
    np.testing.assert_array_equal(rows[:, 2], task.eval_images())
    np.testing.assert_array_equal(rows[:, 1], decoder.to_uint8(samples))
    np.testing.assert_array_equal(rows[:, 0, ::2, ::2], decoder.to_uint8(low_res))


def test_psnr_of_known_errors():
    reference = np.zeros((2, 4, 4, 3))
    shifted = reference + np.array([0.02, 0.2])[:, None, None, None]
    np.testing.assert_allclose(upsampler.psnr(shifted, reference), [10 * np.log10(4 / 0.0004), 10 * np.log10(100)])
    assert upsampler.psnr(reference, reference)[0] == np.inf
    with pytest.raises(ValueError, match="images"):
        upsampler.psnr(reference[:1], reference)


def test_crop_sizes():
    assert upsampler.crop_size_for(64, 0.25, 4) == 32
    assert upsampler.crop_size_for(256, 0.25, 8) == 128
    assert upsampler.crop_size_for(64, 0.5, 4) == 44  # 45.25 down to the 4px grid
    assert upsampler.crop_size_for(64, 1.0, 8) == 64
    for fraction in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="config.crop_fraction"):
            upsampler.crop_size_for(64, fraction, 4)
    with pytest.raises(ValueError, match="config.crop_fraction"):
        upsampler.crop_size_for(16, 0.01, 4)


def test_bad_configuration_raises(data_dir):
    def make(**extra):
        return upsampler.make_task(config_util.load_config("configs/upsampler.py:tiny",
                                                           upsampler_overrides(data_dir, **extra)))

    with pytest.raises(ValueError, match="config.low_res_size"):
        make(low_res_size=12)
    with pytest.raises(ValueError, match="config.degradation"):
        make(degradation="jpeg")
    with pytest.raises(ValueError, match="config.model.use_low_res"):
        make(**{"model.use_low_res": False})
    with pytest.raises(ValueError, match="config.model"):
        make(**{"model.use_image_embed": True})
    with pytest.raises(ValueError, match="config.data.image_size"):
        make(**{"data.image_size": 64})
    with pytest.raises(ValueError, match="config.data.data_dir"):
        make(**{"data.data_dir": ""})
    with pytest.raises(ValueError, match="config.diffusion.objective"):
        make(**{"diffusion.objective": "v", "diffusion.residual": True})


def test_residual_loss_measures_the_error_of_bicubic_plus_the_network(task):
    # tiny is residual x0: with the output convolution at zero the prediction is the upsampled
    # (blurred) low-res crop itself, and the per-example mse is exactly its error.
    assert task.residual and task.objective == "x0"
    images = jnp.asarray(decoder.to_float(task.eval_images()))
    params = task.init_params(jax.random.key(0), None)
    params = dict(params, conv_out=jax.tree_util.tree_map(jnp.zeros_like, params["conv_out"]))
    key = jax.random.key(5)
    losses = jax.jit(lambda p: task.example_losses(p, {"image": images}, key))(params)
    pair_key = jax.random.split(key, 5)[0]
    high, low_up = task.training_pair(pair_key, images)
    np.testing.assert_allclose(losses["mse"], np.mean(np.square(high - low_up), axis=(1, 2, 3)), rtol=1e-5)
    assert float(jnp.min(losses["mse"])) > 0  # the blur leaves an error for the network to remove
