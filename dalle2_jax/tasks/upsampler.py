"""The upsampler stages: super-resolution diffusion conditioned on a degraded low-res image.

  task = make_task(config, workdir)          # `dalle2-jax train upsampler`, through training.loop

Batches hold high-resolution images at `model.image_size`. Inside the jitted
loss each is area-downsampled to `config.low_res_size` and degraded as
`config.degradation` says (Ramesh et al. 2022, Appendix C): "blur" blurs the
low-res image with a random Gaussian (the 64 -> 256 upsampler), "bsr" makes it
from the high-res image by BSR-style blur, random-method resizing and noise
(256 -> 1024). The degraded image is resized back up to full size exactly as
`dalle2_jax.sampling.upsample_images` does before sampling, and the UNet is
trained on random crops covering `crop_fraction` of the area of the aligned
(high-res, upsampled low-res) pair; being fully convolutional it samples at
full size. With `model.use_noise_level` the conditioning image is also noised
to a random level, which the network sees. With `diffusion.residual` (objective "x0") the
network predicts the clean image minus the upsampled conditioning image, so an untrained one
returns that image (bicubic) and noise in x_t is not passed through to the output.

Evaluation upsamples the clean low-res versions of the first test images,
writes workdir/samples/step_<N>.png (rows: low-res input, sample, ground truth)
and returns the samples' PSNR against the ground truth, beside the PSNR of
plain bicubic upsampling.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from dalle2_jax import augment, diffusion, sampling
from dalle2_jax.data import pipeline
from dalle2_jax.models.unet import UNet
from dalle2_jax.tasks import clip as clip_stage
from dalle2_jax.tasks import decoder as decoder_stage
from dalle2_jax.training import metrics as metrics_lib

TRAIN_KEYS = ("image",)
DEGRADATIONS = ("blur", "bsr", "none")
SAMPLES_SUBDIR = decoder_stage.SAMPLES_SUBDIR


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of [-1, 1] float images (peak-to-peak 2); inf where identical."""
    images, references = np.asarray(images, np.float64), np.asarray(references, np.float64)
    if images.shape != references.shape or images.ndim != 4:
        raise ValueError(f"images: expected (B, H, W, C) of the shape of references {references.shape}, "
                         f"got {images.shape}")
    mse = np.mean(np.square(images - references), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(4.0 / mse)


def crop_size_for(image_size: int, crop_fraction: float, grid: int) -> int:
    """Side of the training crops: image_size * sqrt(crop_fraction) rounded down to a multiple of
    `grid` (the UNet's coarsest stride and the low-res pixel size)."""
    if isinstance(crop_fraction, bool) or not isinstance(crop_fraction, (int, float)) or not 0 < crop_fraction <= 1:
        raise ValueError(f"config.crop_fraction: expected a fraction of the area in (0, 1], got {crop_fraction!r}")
    side = int(math.floor(image_size * math.sqrt(crop_fraction) + 1e-9))
    side -= side % grid
    if side < grid:
        raise ValueError(f"config.crop_fraction: {crop_fraction} gives crops smaller than the {grid}px grid "
                         f"of the UNet and the low-res pixels")
    return side


def aligned_crops(rng: jax.Array, arrays, crop_size: int, grid: int):
    """The same random (crop_size, crop_size) window of each (B, S, S, C) array, per example, at
    offsets that are multiples of `grid`, so a crop sees the pixel grids of the full image."""
    size = arrays[0].shape[1]
    top_key, left_key = jax.random.split(rng)
    batch = arrays[0].shape[0]
    top = jax.random.randint(top_key, (batch,), 0, (size - crop_size) // grid + 1) * grid
    left = jax.random.randint(left_key, (batch,), 0, (size - crop_size) // grid + 1) * grid

    def crop(array):
        window = (crop_size, crop_size, array.shape[-1])
        return jax.vmap(lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0), window))(array, top, left)

    return tuple(crop(array) for array in arrays)


class UpsamplerTask:
    """`training.task.Task` of an upsampler stage; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
                 planning: bool = False):
        decoder_stage.check_data_config(config, workdir, planning=planning)
        self.config = config
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.unet = UNet(**config.model)
        if not self.unet.use_low_res:
            raise ValueError("config.model.use_low_res: expected True for an upsampler")
        if self.unet.use_image_embed or self.unet.use_text_encodings or self.unet.use_text_embed:
            raise ValueError("config.model: an upsampler takes no CLIP conditioning (use_image_embed, "
                             "use_text_encodings and use_text_embed must be False)")
        self.image_size = int(self.unet.image_size)
        self.low_res_size = decoder_stage.check_positive(config.get("low_res_size"), "config.low_res_size")
        if self.image_size % self.low_res_size or self.low_res_size >= self.image_size:
            raise ValueError(f"config.low_res_size: expected a proper divisor of model.image_size "
                             f"{self.image_size}, got {self.low_res_size}")
        self.degradation = config.get("degradation", "blur")
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"config.degradation: expected one of {DEGRADATIONS}, got {self.degradation!r}")
        self.grid = math.lcm(2 ** (len(self.unet.level_channels) - 1), self.image_size // self.low_res_size)
        self.crop_size = crop_size_for(self.image_size, config.get("crop_fraction", 0.25), self.grid)
        diffusion_config = config.diffusion
        self.schedule = diffusion.make_schedule(diffusion_config.schedule, int(diffusion_config.num_timesteps))
        self.objective = diffusion_config.get("objective", "eps")
        self.residual = diffusion_config.get("residual", False)
        if not isinstance(self.residual, bool):
            raise ValueError(f"config.diffusion.residual: expected a bool, got {self.residual!r}")
        if self.residual and self.objective != "x0":
            raise ValueError(f"config.diffusion.objective: a residual upsampler (config.diffusion.residual) "
                             f"predicts x0, expected 'x0', got {self.objective!r}")
        self.augment_config = config.get("augment") or ml_collections.ConfigDict()
        self.max_noise_level = int(self.augment_config.get("max_noise_level", 0))
        if self.unet.use_noise_level and not 0 <= self.max_noise_level < self.schedule.num_timesteps:
            raise ValueError(f"config.augment.max_noise_level: expected a level in [0, "
                             f"{self.schedule.num_timesteps}), got {self.max_noise_level}")
        self.load_size = int(config.data.get("image_size", 0)) or self.image_size
        if self.load_size != self.image_size:
            raise ValueError(f"config.data.image_size: expected 0 or the model's {self.image_size}, "
                             f"got {self.load_size}")
        self._builder = None
        self._eval_images = None

    @property
    def data_dir(self) -> str:
        return self.config.data.get("data_dir") or clip_stage.default_data_dir(self.workdir)

    @property
    def builder(self) -> tfds.core.DatasetBuilder:
        if self._builder is None:
            data_config = ml_collections.ConfigDict(self.config.data.to_dict())
            data_config.image_size = self.load_size
            self._builder = clip_stage.build_dataset(data_config, self.data_dir)
            clip_stage._check_split(self._builder, "train", "config.data")
        return self._builder

    # -- degradation and loss -----------------------------------------------------------------

    def low_res_images(self, high_res: jax.Array) -> jax.Array:
        """The clean conditioning image: `high_res` area-downsampled to low_res_size."""
        return decoder_stage.downsample_images(high_res, self.low_res_size)

    def degrade(self, rng: jax.Array, high_res: jax.Array) -> jax.Array:
        """The training conditioning image (B, low, low, 3) per `config.degradation`."""
        settings = self.augment_config
        if self.degradation == "bsr":
            return augment.bsr_degrade(
                rng, high_res, self.low_res_size,
                blur_sigma_range=tuple(settings.get("bsr_blur_sigma_range", (0.2, 2.0))),
                updown_prob=float(settings.get("bsr_updown_prob", 0.5)),
                noise_range=tuple(settings.get("bsr_noise_range", (0.0, 0.1))))
        low_res = self.low_res_images(high_res)
        if self.degradation == "blur":
            low_res = augment.blur_augment(rng, low_res, tuple(settings.get("blur_sigma_range", (0.4, 0.6))))
        return low_res

    def upsampled(self, low_res: jax.Array) -> jax.Array:
        """`low_res` resized to full size as `sampling.upsample_images` does."""
        shape = (low_res.shape[0], self.image_size, self.image_size, low_res.shape[-1])
        return jax.image.resize(low_res.astype(jnp.float32), shape, self.unet.low_res_resize)

    def training_pair(self, rng: jax.Array, high_res: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(high-res crops, upsampled degraded low-res crops) of one aligned random window each."""
        degrade_key, crop_key = jax.random.split(rng)
        high_res = high_res.astype(jnp.float32)
        low_up = self.upsampled(self.degrade(degrade_key, high_res))
        if self.crop_size == self.image_size:
            return high_res, low_up
        return aligned_crops(crop_key, (high_res, low_up), self.crop_size, self.grid)

    def _unet_kwargs(self, rng, low_up, size):
        if not self.unet.use_noise_level:
            return {"low_res": low_up}
        level_key, noise_key = jax.random.split(rng)
        level = jax.random.randint(level_key, (size,), 0, self.max_noise_level + 1)
        noised = diffusion.q_sample(self.schedule, low_up, level, jax.random.normal(noise_key, low_up.shape))
        return {"low_res": noised, "noise_level": level}

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batches `train_iterator` yields: full-size images."""
        return {"image": jax.ShapeDtypeStruct((batch_size, self.load_size, self.load_size, 3), jnp.float32)}

    def init_params(self, rng, batch):
        size = self.crop_size
        x = jnp.zeros((1, size, size, self.unet.out_channels), jnp.float32)
        kwargs = {"low_res": jnp.zeros((1, size, size, 3), jnp.float32)}
        if self.unet.use_noise_level:
            kwargs["noise_level"] = jnp.zeros((1,), jnp.int32)
        return self.unet.init(rng, x, jnp.zeros((1,), jnp.int32), **kwargs)["params"]

    def example_losses(self, params, batch, rng, *, t: jax.Array | None = None, train: bool = True
                       ) -> dict[str, jax.Array]:
        """Per-example losses of `diffusion.training_losses` on the crops, at timesteps `t` (B,)
        (default: uniform draws from `rng`)."""
        pair_key, t_key, noise_key, level_key, dropout_key = jax.random.split(rng, 5)
        x_start, low_up = self.training_pair(pair_key, batch["image"])
        size = x_start.shape[0]
        if t is None:
            t = jax.random.randint(t_key, (size,), 0, self.schedule.num_timesteps)
        noise = jax.random.normal(noise_key, x_start.shape, jnp.float32)
        x_t = diffusion.q_sample(self.schedule, x_start, t, noise)
        output = self.unet.apply({"params": params}, x_t, self.schedule.timesteps[t],
                                 **self._unet_kwargs(level_key, low_up, size), train=train,
                                 rngs={"dropout": dropout_key})
        if self.residual:
            output = sampling.add_low_res(output, low_up)
        return diffusion.training_losses(
            self.schedule, output, x_start=x_start, x_t=x_t, t=t, noise=noise, objective=self.objective,
            learned_variance=self.unet.learned_variance,
            vlb_weight=float(self.config.diffusion.get("vlb_weight", 1e-3)),
            snr_gamma=float(self.config.diffusion.get("snr_gamma", 0.0)))

    def loss(self, params, batch, rng, *, train: bool = True):
        losses = self.example_losses(params, batch, rng, train=train)
        return jnp.mean(losses["loss"]), {name: jnp.mean(value) for name, value in losses.items() if name != "loss"}

    def train_iterator(self, *, seed: int, process_index: int, process_count: int, per_process_batch: int):
        data = self.config.data
        iterator = pipeline.make_image_text_iterator(
            self.builder.as_data_source("train"), batch_size=per_process_batch, seed=seed,
            process_index=process_index, process_count=process_count, image_size=self.load_size,
            augment=data.get("augment", "center_crop"), random_flip=bool(data.get("random_flip", True)),
            worker_count=int(data.get("worker_count", 0)))
        return clip_stage.KeepKeys(iterator, TRAIN_KEYS)

    # -- evaluation ---------------------------------------------------------------------------

    def eval_images(self) -> np.ndarray:
        """uint8 (N, S, S, 3): the first `config.eval.num_images` test images (train without a test split)."""
        if self._eval_images is None:
            count = decoder_stage.check_positive(self.config.eval.get("num_images", 8), "config.eval.num_images")
            items = decoder_stage.first_examples(self.builder, decoder_stage.eval_split(self.builder), count)
            self._eval_images = np.stack([clip_stage._square(item["image"], self.load_size) for item in items])
        return self._eval_images

    def sample(self, params, low_res, *, rng, steps: int | None = None) -> np.ndarray:
        """Full-size samples (B, S, S, 3) in [-1, 1] for [-1, 1] low-res images (B, s, s, 3),
        batch-sharded over the mesh of `params`."""
        diffusion_config = self.config.diffusion
        rows, count = decoder_stage.shard_rows({"low_res": np.asarray(low_res, np.float32)},
                                               decoder_stage.mesh_of(params))
        samples = sampling.upsample_images(
            self.unet, {"params": params}, rng, rows["low_res"], schedule=self.schedule,
            steps=int(steps or self.config.eval.sampling_steps), sampler=diffusion_config.get("sampler", "ddim"),
            eta=float(diffusion_config.get("eta", 0.0)), objective=self.objective,
            clip_denoised=bool(diffusion_config.get("clip_denoised", True)), residual=self.residual)
        return decoder_stage.gather_rows(samples, count)

    def evaluate(self, params, *, step: int, workdir: str) -> dict[str, float]:
        """Upsampled test images -> workdir/samples/step_<step>.png; PSNR against the ground truth."""
        truth = decoder_stage.to_float(self.eval_images())
        low_res = np.asarray(self.low_res_images(jnp.asarray(truth)))
        samples = self.sample(params, low_res, rng=jax.random.key(int(self.config.eval.get("seed", 0))))
        bicubic = jax.image.resize(jnp.asarray(low_res), truth.shape, "bicubic")
        if jax.process_index() == 0:
            factor = self.image_size // self.low_res_size
            low_nearest = np.repeat(np.repeat(decoder_stage.to_uint8(low_res), factor, axis=1), factor, axis=2)
            rows = np.stack([low_nearest, decoder_stage.to_uint8(samples), decoder_stage.to_uint8(truth)], axis=1)
            metrics_lib.write_image_grid(os.path.join(workdir, SAMPLES_SUBDIR, f"step_{step}.png"),
                                         rows.reshape(-1, *truth.shape[1:]), ncols=3)
        return {"psnr": float(np.mean(psnr(samples, truth))),
                "bicubic_psnr": float(np.mean(psnr(np.clip(np.asarray(bicubic), -1, 1), truth)))}


def make_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
              planning: bool = False) -> UpsamplerTask:
    """planning=True: from the config alone (no data read), for `dalle2-jax plan`."""
    return UpsamplerTask(config, workdir, planning=planning)
