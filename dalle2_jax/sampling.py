"""Stage-level sampling for the UNet stages: decode, invert, upsample and inpaint.

Each function checks its arguments on the host, respaces the stage's training schedule to
`steps` (that needs concrete arrays, so pass the schedule itself, not a traced one) and runs
ONE jitted program: the whole sampling loop is a `lax.scan` inside it. Programs are cached
per (module, static options, shapes); the guidance scale is traced, so changing it does not
recompile. Images are float NHWC in [-1, 1]; conditioning follows `dalle2_jax.models.unet.UNet`.

Classifier-free guidance runs [cond; uncond] as one batch; the unconditional half sets both
`drop_image` and `drop_text`. Without a caption (image variations: no text encodings, or
`drop_text=True`) the caption is dropped in both halves, so only the image embedding is guided.
A Python `guidance_scale` of exactly 1 samples the conditional model alone (half the work); pass
an array to force the guided batch.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion

SAMPLERS = diffusion.SAMPLERS  # "ddim", "ddpm" and the fast solvers "dpm++2m", "dpm++2m-sde", "dpm++3m", "unipc"


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def respaced(schedule: diffusion.DiffusionSchedule, steps: int) -> diffusion.DiffusionSchedule:
    """`schedule` respaced to `steps` evenly strided steps (itself when it already has that many)."""
    steps = _positive_int(steps, "steps")
    if steps > schedule.num_timesteps:
        raise ValueError(f"steps: expected at most the schedule's {schedule.num_timesteps} steps, got {steps}")
    return schedule if schedule.num_timesteps == steps else diffusion.respace(schedule, steps)


def sampler_schedule(schedule, steps: int, sampler: str):
    """What `sampler` runs on: `schedule` (the training schedule, or what this returned before)
    respaced to `steps` for DDPM/DDIM, the solvers' SolverSchedule of `steps` trailing steps."""
    steps = _positive_int(steps, "steps")
    if isinstance(schedule, diffusion.DiffusionSchedule) and steps > schedule.num_timesteps:
        raise ValueError(f"steps: expected at most the schedule's {schedule.num_timesteps} steps, got {steps}")
    return diffusion.sampler_schedule(schedule, steps, sampler)


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        size = (image_size, image_size)
    else:
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size):
        raise ValueError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def _kernel_rows(params, name: str) -> int | None:
    """Input width of the Dense layer `name` at the top of a UNet's params, if present."""
    tree = params.get("params", params) if hasattr(params, "get") else {}
    layer = tree.get(name) if hasattr(tree, "get") else None
    return None if layer is None else int(np.shape(layer["kernel"])[0])


def _null_text_shape(params) -> tuple[int, int] | None:
    tree = params.get("params", params) if hasattr(params, "get") else {}
    null = tree.get("null_text_encodings") if hasattr(tree, "get") else None
    return None if null is None else tuple(int(n) for n in np.shape(null))


def _check_images(images, name: str, batch: int | None = None, channels: int = 3) -> jax.Array:
    shape = np.shape(images)
    if len(shape) != 4 or shape[-1] != channels or 0 in shape or (batch is not None and shape[0] != batch):
        expected = f"({'B' if batch is None else batch}, H, W, {channels})"
        raise ValueError(f"{name}: expected float images of shape {expected} in [-1, 1], got shape {shape}")
    if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
        raise ValueError(f"{name}: expected float images in [-1, 1], got dtype {jnp.asarray(images).dtype}")
    return jnp.asarray(images, jnp.float32)


def decoder_conditioning(unet, params, batch: int, *, image_embed=None, text_encodings=None,
                         text_mask=None, text_embed=None, drop_text: bool = False) -> tuple[dict, dict]:
    """(cond, uncond) keyword arguments of a decoder UNet for a batch, checked against its params.

    drop_text=True drops the caption in both halves (the text arrays then only fix the shapes);
    missing text is fed as one stand-in token, dropped.
    """
    cond: dict[str, Any] = {}
    drop_none = jnp.zeros((batch,), bool)
    if unet.use_image_embed:
        width = _kernel_rows(params, "image_embed_to_time")
        shape = np.shape(image_embed) if image_embed is not None else None
        if shape is None or len(shape) != 2 or shape[0] != batch or (width is not None and shape[1] != width):
            raise ValueError(f"image_embed: expected shape ({batch}, {width or 'D'}), got {shape}")
        cond["image_embed"] = jnp.asarray(image_embed, jnp.float32)
        cond["drop_image"] = drop_none
    drop_text = jnp.full((batch,), bool(drop_text))
    if unet.use_text_encodings:
        width = _kernel_rows(params, "text_encodings_proj")
        if text_encodings is None:
            # a UNet that stores its null caption (Karlo's empty caption) takes text of its length
            stored = _null_text_shape(params) if unet.null_text_tokens else None
            length, width = stored if stored is not None else (1, width or unet.context_dim)
            text_encodings = jnp.zeros((batch, length, width), jnp.float32)
            text_mask = jnp.ones((batch, length), bool)
            drop_text = jnp.ones((batch,), bool)
        shape = np.shape(text_encodings)
        if len(shape) != 3 or shape[0] != batch or (width is not None and shape[2] != width):
            raise ValueError(f"text_encodings: expected shape ({batch}, L, {width or 'W'}), got {shape}")
        if text_mask is None:
            text_mask = jnp.ones(shape[:2], bool)
        if np.shape(text_mask) != shape[:2]:
            raise ValueError(f"text_mask: expected shape {shape[:2]}, got {np.shape(text_mask)}")
        cond["text_encodings"] = jnp.asarray(text_encodings, jnp.float32)
        cond["text_mask"] = jnp.asarray(text_mask).astype(bool)
    if unet.use_text_embed:
        width = _kernel_rows(params, "text_embed_to_time")
        if text_embed is None:
            text_embed = jnp.zeros((batch, width or 1), jnp.float32)
            drop_text = jnp.ones((batch,), bool)
        shape = np.shape(text_embed)
        if len(shape) != 2 or shape[0] != batch or (width is not None and shape[1] != width):
            raise ValueError(f"text_embed: expected shape ({batch}, {width or 'D'}), got {shape}")
        cond["text_embed"] = jnp.asarray(text_embed, jnp.float32)
    if unet.use_text_encodings or unet.use_text_embed:
        cond["drop_text"] = drop_text
    uncond = dict(cond)
    for flag in ("drop_image", "drop_text"):
        if flag in cond:
            uncond[flag] = jnp.ones((batch,), bool)
    return cond, uncond


def _check_sampler(sampler: str, eta) -> float:
    """eta as a float (0 for all but DDIM, which alone has an eta: one compiled program whatever is passed)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)) or eta < 0:
        raise ValueError(f"eta: expected a float >= 0, got {eta!r}")
    return float(eta) if sampler == "ddim" else 0.0


def _guided(guidance_scale) -> bool:
    if guidance_scale is None:
        return False
    if isinstance(guidance_scale, (int, float, np.number)) and not isinstance(guidance_scale, bool):
        return float(guidance_scale) != 1.0
    if jnp.ndim(guidance_scale) != 0:
        raise ValueError(f"guidance_scale: expected a scalar, got shape {jnp.shape(guidance_scale)}")
    return True


def _denoiser(unet, params, guidance_scale, uncond, guided: bool):
    denoiser = functools.partial(unet.apply, params)
    if guided:
        denoiser = diffusion.classifier_free_guidance(denoiser, guidance_scale, uncond=uncond,
                                                      learned_variance=unet.learned_variance)
    return denoiser


def _run_sampler(unet, denoiser, rng, x_T, cond, schedule, *, sampler, eta, objective, clip_denoised,
                 dynamic_threshold, clip_range=1.0):
    # eta is static: at 0 the DDIM loop draws no noise at all (half the compile time of a traced eta).
    x0 = diffusion.run_sampler(sampler, denoiser, x_T, schedule, rng, cond=cond, eta=eta, objective=objective,
                               learned_variance=unet.learned_variance, clip_denoised=clip_denoised,
                               clip_range=clip_range, dynamic_threshold=dynamic_threshold)
    return jnp.clip(x0, -1.0, 1.0)


def _initial_noise(rng, x_T, shape):
    """(x_T, the sampler's key): x_T drawn from rng when not given."""
    if x_T is not None:
        return x_T, rng
    noise_key, sample_key = jax.random.split(rng)
    return jax.random.normal(noise_key, shape, jnp.float32), sample_key


_STATIC = ("unet", "shape", "sampler", "eta", "objective", "clip_denoised", "dynamic_threshold", "guided")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode_program(unet, params, rng, x_T, cond, uncond, schedule, guidance_scale, *, shape, sampler, eta,
                    objective, clip_denoised, dynamic_threshold, guided):
    x_T, sample_key = _initial_noise(rng, x_T, shape)
    denoiser = _denoiser(unet, params, guidance_scale, uncond, guided)
    return _run_sampler(unet, denoiser, sample_key, x_T, cond, schedule, sampler=sampler, eta=eta,
                        objective=objective, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)


def _check_x_T(x_T, shape):
    if x_T is None:
        return None
    if np.shape(x_T) != shape:
        raise ValueError(f"x_T: expected shape {shape}, got {np.shape(x_T)}")
    return jnp.asarray(x_T, jnp.float32)


def _check_rng(rng, needed: bool):
    if rng is None:
        if needed:
            raise ValueError("rng: required unless x_T is given and the sampler is deterministic (DDIM with eta 0, "
                             "dpm++2m, dpm++3m, unipc), got None")
        return jax.random.key(0)  # drives nothing
    return rng


def _batch_of(image_embed, text_encodings, text_embed, fallback=None) -> int:
    for value in (image_embed, text_encodings, text_embed, fallback):
        if value is not None and np.ndim(value) >= 1:
            return int(np.shape(value)[0])
    raise ValueError("image_embed: expected (B, D) embeddings (or text_encodings) to set the batch size, got None")


def decode_images(unet, params, rng, *, image_embed=None, text_encodings=None, text_mask=None, text_embed=None,
                  drop_text: bool = False, schedule: diffusion.DiffusionSchedule, steps: int, guidance_scale=1.0,
                  sampler: str = "ddim", eta: float = 0.0, x_T=None, image_size, objective: str = "eps",
                  clip_denoised: bool = True, dynamic_threshold: float | None = None) -> jax.Array:
    """Decoder samples (B, H, W, 3) in [-1, 1] for B CLIP image embeddings (and captions).

    x_T (B, H, W, 3) replaces the initial noise (e.g. from `invert_images`); rng then only
    drives DDPM / DDIM eta > 0 noise. A learned-variance UNet (6 output channels) uses its
    variance with sampler "ddpm"; DDIM and the solvers ("dpm++2m", ... see SAMPLERS) ignore it.
    """
    eta = _check_sampler(sampler, eta)
    height, width = _image_size(image_size)
    batch = _batch_of(image_embed, text_encodings, text_embed, x_T)
    shape = (batch, height, width, unet.out_channels)
    x_T = _check_x_T(x_T, shape)
    rng = _check_rng(rng, needed=x_T is None or sampler not in diffusion.DETERMINISTIC or eta != 0.0)
    cond, uncond = decoder_conditioning(unet, params, batch, image_embed=image_embed, text_encodings=text_encodings,
                                        text_mask=text_mask, text_embed=text_embed, drop_text=drop_text)
    guided = _guided(guidance_scale)
    return _decode_program(unet, params, rng, x_T, cond, uncond, sampler_schedule(schedule, steps, sampler),
                           jnp.asarray(1.0 if guidance_scale is None else guidance_scale, jnp.float32),
                           shape=shape, sampler=sampler, eta=eta, objective=objective,
                           clip_denoised=bool(clip_denoised), dynamic_threshold=dynamic_threshold, guided=guided)


@functools.partial(jax.jit, static_argnames=("unet", "objective", "fixed_point_iters"))
def _invert_program(unet, params, images, cond, schedule, *, objective, fixed_point_iters):
    denoiser = functools.partial(unet.apply, params)
    return diffusion.ddim_invert(denoiser, images, schedule, cond=cond, objective=objective,
                                 learned_variance=unet.learned_variance, fixed_point_iters=fixed_point_iters)


def invert_images(unet, params, images, *, image_embed=None, text_encodings=None, text_mask=None, text_embed=None,
                  drop_text: bool = False, schedule: diffusion.DiffusionSchedule, steps: int,
                  objective: str = "eps", fixed_point_iters: int = 1) -> jax.Array:
    """The x_T from which unguided DDIM (eta 0, `clip_denoised=False`) with the same conditioning
    and steps decodes back to `images` (B, H, W, 3); conditional, never guided."""
    images = _check_images(images, "images")
    batch = images.shape[0]
    cond, _ = decoder_conditioning(unet, params, batch, image_embed=image_embed, text_encodings=text_encodings,
                                   text_mask=text_mask, text_embed=text_embed, drop_text=drop_text)
    if isinstance(fixed_point_iters, bool) or not isinstance(fixed_point_iters, (int, np.integer)) \
            or fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters: expected an int >= 0, got {fixed_point_iters!r}")
    return _invert_program(unet, params, images, cond, respaced(schedule, steps), objective=objective,
                           fixed_point_iters=int(fixed_point_iters))


def _last_step_switch(unet, params, last_step_params, schedule):
    """A denoiser running `last_step_params` at the schedule's last step and `params` before
    it: Karlo's super_res_last / super_res_first."""
    if last_step_params is None:
        return functools.partial(unet.apply, params)
    # A DiffusionSchedule is indexed by level (its last step is index 0), a SolverSchedule in
    # sampling order.
    last_t = schedule.timesteps[-1] if isinstance(schedule, diffusion.SolverSchedule) else schedule.timesteps[0]

    def denoiser(x, t, **cond):
        return jax.lax.cond(t[0] == last_t, lambda: unet.apply(last_step_params, x, t, **cond),
                            lambda: unet.apply(params, x, t, **cond))

    return denoiser


def add_low_res(model_output: jax.Array, low_up: jax.Array) -> jax.Array:
    """A residual upsampler's x0 prediction: the network's output plus the upsampled low-res image
    `low_up` (on the prediction half of a learned-variance output)."""
    channels = low_up.shape[-1]
    if model_output.shape[-1] == channels:
        return model_output + low_up.astype(model_output.dtype)
    return jnp.concatenate([model_output[..., :channels] + low_up.astype(model_output.dtype),
                            model_output[..., channels:]], axis=-1)


def check_residual(residual, objective: str) -> bool:
    """`residual` (a residual upsampler predicts x0 as the upsampled low-res image plus its output)
    as a bool; it needs the x0 objective."""
    if not isinstance(residual, (bool, np.bool_)):
        raise ValueError(f"residual: expected a bool, got {residual!r}")
    if residual and objective != "x0":
        raise ValueError(f"objective: a residual upsampler predicts x0, expected 'x0', got {objective!r}")
    return bool(residual)


@functools.partial(jax.jit, static_argnames=_STATIC + ("residual",))
def _upsample_program(unet, params, last_step_params, rng, x_T, low_res, noise_level, schedule, *, shape, sampler,
                      eta, objective, clip_denoised, dynamic_threshold, guided, residual):
    del guided
    x_T, sample_key = _initial_noise(rng, x_T, shape)
    low_res = jax.image.resize(low_res, shape[:3] + (low_res.shape[-1],), unet.low_res_resize)
    cond = {"low_res": low_res}
    if noise_level is not None:
        cond["noise_level"] = noise_level
    denoiser = _last_step_switch(unet, params, last_step_params, schedule)
    if residual:
        network = denoiser
        denoiser = lambda x, t, **kwargs: add_low_res(network(x, t, **kwargs), low_res)  # noqa: E731
    return _run_sampler(unet, denoiser, sample_key, x_T, cond, schedule, sampler=sampler, eta=eta,
                        objective=objective, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)


def upsample_images(unet, params, rng, low_res, *, schedule: diffusion.DiffusionSchedule, steps: int,
                    out_size=None, sampler: str = "ddim", eta: float = 0.0, x_T=None, objective: str = "eps",
                    clip_denoised: bool = True, dynamic_threshold: float | None = None,
                    noise_level: int = 0, last_step_params=None, residual: bool = False) -> jax.Array:
    """Super-resolve `low_res` (B, h, w, 3) in [-1, 1] to (B, H, W, 3), H, W = out_size (default
    the UNet's image_size); the low-res image is resized once, inside the program. `noise_level`
    is the augmentation level fed to a `use_noise_level` UNet (0: a clean low-res image).
    `last_step_params` (variables of the same UNet) run the last step instead of `params`
    (Karlo's super_res_last). residual=True: the UNet predicts x0 minus the resized low-res image
    (objective "x0")."""
    eta = _check_sampler(sampler, eta)
    residual = check_residual(residual, objective)
    if not unet.use_low_res:
        raise ValueError("unet: expected an upsampler UNet (use_low_res=True)")
    low_res = _check_images(low_res, "low_res")
    height, width = _image_size(unet.image_size if out_size is None else out_size)
    batch = low_res.shape[0]
    shape = (batch, height, width, unet.out_channels)
    x_T = _check_x_T(x_T, shape)
    rng = _check_rng(rng, needed=x_T is None or sampler not in diffusion.DETERMINISTIC or eta != 0.0)
    level = None
    if unet.use_noise_level:
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)) or noise_level < 0:
            raise ValueError(f"noise_level: expected an int >= 0, got {noise_level!r}")
        level = jnp.full((batch,), noise_level, jnp.int32)
    return _upsample_program(unet, params, last_step_params, rng, x_T, low_res, level,
                             sampler_schedule(schedule, steps, sampler),
                             shape=shape, sampler=sampler, eta=eta, objective=objective,
                             clip_denoised=bool(clip_denoised),
                             dynamic_threshold=dynamic_threshold, guided=False, residual=residual)


@functools.partial(jax.jit, static_argnames=("unet", "objective", "clip_denoised", "dynamic_threshold", "guided",
                                             "jump_length", "jump_n_sample", "sampler"))
def _inpaint_program(unet, params, rng, x_T, images, mask, cond, uncond, schedule, guidance_scale, *, objective,
                     clip_denoised, dynamic_threshold, guided, jump_length, jump_n_sample, sampler="ddpm"):
    x_T, sample_key = _initial_noise(rng, x_T, images.shape)
    denoiser = _denoiser(unet, params, guidance_scale, uncond, guided)
    if sampler == "ddpm":
        x0 = diffusion.repaint_sample(
            denoiser, x_T, schedule, sample_key, x_known=images, mask=mask, cond=cond, jump_length=jump_length,
            jump_n_sample=jump_n_sample, objective=objective, learned_variance=unet.learned_variance,
            clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold)
    else:  # the known region re-noised to every level the sampler reaches (no resampling jumps)
        hook = (diffusion.solver_known_region_hook if sampler in diffusion.SOLVERS
                else diffusion.known_region_hook)(schedule, images, mask)
        x0 = diffusion.run_sampler(sampler, denoiser, x_T, schedule, sample_key, cond=cond, objective=objective,
                                   learned_variance=unet.learned_variance, clip_denoised=clip_denoised,
                                   dynamic_threshold=dynamic_threshold, step_hook=hook)
    return jnp.where(mask, jnp.clip(x0, -1.0, 1.0), images)


def inpaint_images(unet, params, rng, images, mask, *, image_embed=None, text_encodings=None, text_mask=None,
                   text_embed=None, drop_text: bool = False, schedule: diffusion.DiffusionSchedule, steps: int,
                   guidance_scale=1.0, jump_length: int = 10, jump_n_sample: int = 1, x_T=None, objective: str = "eps",
                   clip_denoised: bool = True, dynamic_threshold: float | None = None,
                   sampler: str = "ddpm") -> jax.Array:
    """Regenerate `images` (B, H, W, 3) where `mask` ((B, H, W) or (B, H, W, 1), True = replace) is
    set; the rest is kept exactly. sampler "ddpm": RePaint (ancestral sampling with resampling
    jumps); any other sampler of SAMPLERS runs with the known region re-noised to each level it
    reaches (jump_length / jump_n_sample unused)."""
    _check_sampler(sampler, 0.0)
    images = _check_images(images, "images")
    batch, height, width, _ = images.shape
    mask_shape = np.shape(mask)
    if mask_shape not in ((batch, height, width), (batch, height, width, 1)):
        raise ValueError(f"mask: expected shape ({batch}, {height}, {width}) of the images, got {mask_shape}")
    mask = jnp.asarray(mask).astype(bool).reshape(batch, height, width, 1)
    jump_length = _positive_int(jump_length, "jump_length")
    jump_n_sample = _positive_int(jump_n_sample, "jump_n_sample")
    x_T = _check_x_T(x_T, images.shape)
    cond, uncond = decoder_conditioning(unet, params, batch, image_embed=image_embed, text_encodings=text_encodings,
                                        text_mask=text_mask, text_embed=text_embed, drop_text=drop_text)
    guided = _guided(guidance_scale)
    return _inpaint_program(unet, params, rng, x_T, images, mask, cond, uncond,
                            sampler_schedule(schedule, steps, sampler),
                            jnp.asarray(1.0 if guidance_scale is None else guidance_scale, jnp.float32),
                            objective=objective, clip_denoised=bool(clip_denoised),
                            dynamic_threshold=dynamic_threshold, guided=guided, jump_length=jump_length,
                            jump_n_sample=jump_n_sample, sampler=sampler)
