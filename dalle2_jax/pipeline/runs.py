"""The stage runs of a pipeline: CLIP, the prior (diffusion or autoregressive), the decoder
(sampling and DDIM inversion) and the upsamplers, each as one jitted program, with their steps,
guidance scales, samplers and keys resolved from the arguments and the stage configs.
`UnCLIPPipeline` (pipeline/unclip.py) builds its operations from these."""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion, sampling
from dalle2_jax.models import ar_prior as ar_prior_lib
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.models.clip import CLIP, normalize, preprocess_images
from dalle2_jax.pipeline.inputs import (bucket, check_count, check_scale, initial_noise, pad_rows, square_image,
                                        square_mask, to_float)
from dalle2_jax.pipeline.stages import (STAGE_NAME, Stage, config_get, has_last_step_model, is_ar_prior,
                                        prior_uses_text_encodings)

INVERSION_FIXED_POINT_ITERS = 2  # extra model calls per inversion step (diffusion.ddim_invert)


@functools.partial(jax.jit, static_argnames=("model", "unit"))
def _encode_text_program(model: CLIP, variables, input_ids, attention_mask, unit: bool = True):
    text = model.apply(variables, input_ids, attention_mask, method=CLIP.encode_text)
    embeds = text.embeds.astype(jnp.float32)
    return normalize(embeds) if unit else embeds, text.encodings.astype(jnp.float32), text.mask.astype(bool)


@functools.partial(jax.jit, static_argnames=("model", "unit"))
def _encode_image_program(model: CLIP, variables, images_uint8, unit: bool = True):
    pixels = preprocess_images(images_uint8, model.image_size, model.image_mean, model.image_std)
    embeds = model.apply(variables, pixels.astype(jnp.dtype(model.dtype)), method=CLIP.encode_image).embeds
    return normalize(embeds.astype(jnp.float32)) if unit else embeds.astype(jnp.float32)


def check_sampler_argument(sampler) -> None:
    """sampler: None, a name of sampling.SAMPLERS, or a dict of stage name -> such a name."""
    stage_keys = ("prior", "decoder", "upsampler")
    if sampler is None or (isinstance(sampler, str) and sampler in sampling.SAMPLERS):
        return
    if isinstance(sampler, Mapping):
        for key, value in sampler.items():
            if not isinstance(key, str) or not (key in stage_keys or STAGE_NAME.fullmatch(key)) or key == "clip":
                raise ValueError(f"sampler: expected stage names {stage_keys} (or 'upsampler_1', ...) as keys, "
                                 f"got {key!r}")
            if value not in sampling.SAMPLERS:
                raise ValueError(f"sampler[{key!r}]: expected one of {sampling.SAMPLERS}, got {value!r}")
        return
    raise ValueError(f"sampler: expected one of {sampling.SAMPLERS} or a dict of stage name -> sampler, "
                     f"got {sampler!r}")


class StageRuns:
    """The stage runs `UnCLIPPipeline` is made of; needs self.clip, prior, decoder, upsamplers,
    tokenizer, stage_callback, _schedules and _respaced (set by UnCLIPPipeline.__init__)."""

    def _report(self, name: str) -> None:
        if self.stage_callback is not None:
            self.stage_callback(name)

    def _schedule_for(self, stage: Stage, steps: int, sampler: str = "ddim"):
        """The stage's schedule for `steps` steps of `sampler` (respaced, or the solvers' time steps)."""
        key = (stage.name, steps, sampler in diffusion.SOLVERS)
        if key not in self._respaced:
            self._respaced[key] = sampling.sampler_schedule(self._schedules[stage.name], steps, sampler)
        return self._respaced[key]

    def _sampler(self, stage: Stage, sampler, deterministic: bool = False) -> str:
        """The stage's sampler from the `sampler` argument: None (the stage config's
        diffusion.sampler), one name for every stage, or a dict by stage name ("prior", "decoder",
        "upsampler" for all upsamplers, or "upsampler_1", ...; missing ones take the config's).
        deterministic: a stochastic choice (ddpm, dpm++2m-sde) falls back to DDIM (eta 0)."""
        check_sampler_argument(sampler)
        if isinstance(sampler, Mapping):
            sampler = sampler.get(stage.name, sampler.get(stage.kind))
        name = config_get(stage.config, "diffusion.sampler", "ddim") if sampler is None else sampler
        if name not in sampling.SAMPLERS:
            raise ValueError(f"{stage.name}: config diffusion.sampler {name!r} is not one of {sampling.SAMPLERS}")
        return "ddim" if deterministic and name not in diffusion.DETERMINISTIC else name

    def _steps(self, stage: Stage, steps, name: str) -> int:
        if steps is None:
            steps = config_get(stage.config, "diffusion.sampling_steps", 50)
        steps = check_count(steps, name)
        total = self._schedules[stage.name].num_timesteps
        if steps > total:
            raise ValueError(f"{name}: expected at most the {stage.name}'s {total} training steps, got {steps}")
        return steps

    def _upsampler_steps(self, steps) -> list[int]:
        if steps is None or isinstance(steps, (int, np.integer)):
            return [self._steps(stage, steps, "upsampler_steps") for stage in self.upsamplers]
        if not isinstance(steps, Sequence) or len(steps) != len(self.upsamplers):
            raise ValueError(f"upsampler_steps: expected an int or one per upsampler ({len(self.upsamplers)}), "
                             f"got {steps!r}")
        return [self._steps(stage, s, f"upsampler_steps[{i}]") for i, (stage, s) in
                enumerate(zip(self.upsamplers, steps))]

    def _guidance(self, stage: Stage, scale, name: str) -> float:
        return check_scale(config_get(stage.config, "diffusion.guidance_scale", 1.0) if scale is None else scale,
                            name)

    def _key(self, seed: int, stage: Stage) -> jax.Array:
        """The sampler key of a stage: fold_in(key(seed), the stage's position)."""
        return jax.random.fold_in(jax.random.key(seed), [s.name for s in self.stages].index(stage.name))

    def _text(self, captions: list[str]):
        """Text embeddings (B, D; unit norm unless `unit_embeddings` is False), token encodings
        (B, L, W) and mask (B, L) from CLIP. Captions are checked by the callers ("" is the
        unconditional caption of imported UnCLIP models)."""
        self._report("clip")
        tokens = self.tokenizer(captions, allow_empty=True)
        rows = bucket(len(captions))
        out = _encode_text_program(self.clip.module, self.clip.variables, pad_rows(tokens["input_ids"], rows),
                                   pad_rows(tokens["attention_mask"], rows), unit=self.unit_embeddings)
        return tuple(a[:len(captions)] for a in out)

    def _image_embeds(self, images: list[np.ndarray]) -> jax.Array:
        self._report("clip")
        size = self.clip_load_size
        batch = np.stack([square_image(image, size) for image in images])
        embeds = _encode_image_program(self.clip.module, self.clip.variables, pad_rows(batch, bucket(len(batch))),
                                       unit=self.unit_embeddings)
        return embeds[:len(batch)]

    def _sample_prior(self, text, seed: int, steps, guidance_scale, *, argument: str = "prompts",
                      rows_per_caption: int = 1, x_T=None, sampler=None) -> jax.Array:
        """Best-of-k prior samples for CLIP text (embeds, encodings, mask) with `rows_per_caption`
        rows per caption of `argument` (named in the error of a caption too long for the prior).
        x_T: the initial noise (rows, D) (diffusers' prior_latents), with one candidate per row."""
        stage, config = self.prior, self.prior.config
        steps = self._steps(stage, steps, "prior_steps")
        scale = self._guidance(stage, guidance_scale, "prior_guidance_scale")
        prior_sampler = self._sampler(stage, sampler)
        text_embed, encodings, mask = text
        uses_text_encodings = prior_uses_text_encodings(config)
        text_len = config_get(config, "data.text_len")
        if uses_text_encodings and text_len is not None and int(text_len) < encodings.shape[1]:
            # Trained on the first text_len positions: beyond them its null text is untrained.
            encodings, mask, cut_off = prior_lib.cut_text(encodings, mask, int(text_len))
            too_long = np.flatnonzero(cut_off)
            if too_long.size:
                index = "" if argument == "prompt" else f"[{too_long[0] // rows_per_caption}]"
                raise ValueError(f"{argument}{index}: longer than {text_len} tokens, the longest text the prior "
                                 "was trained on (its config.data.text_len)")
        if not uses_text_encodings:
            # The prior was trained on z_t alone: one masked stand-in token (tasks/prior.py).
            batch = text_embed.shape[0]
            encodings = jnp.zeros((batch, 1, stage.module.text_encoding_dim), jnp.float32)
            mask = jnp.zeros((batch, 1), bool)
        self._report("prior")
        count = text_embed.shape[0]
        rows = bucket(count)
        text_embed, encodings, mask = (pad_rows(a, rows) for a in (text_embed, encodings, mask))
        if is_ar_prior(config):
            if x_T is not None:
                raise ValueError("prior_latents: the autoregressive prior samples tokens; it takes no initial noise")
            return self._sample_ar_prior(text_embed, encodings, mask, seed, guidance_scale)[:count]
        null_text = None
        if not stage.module.learned_null_text:
            null_text = tuple(a[0] for a in self._text([""]))  # guided against the empty caption, as Karlo
        num_candidates = int(config_get(config, "diffusion.num_candidates", 1))
        if x_T is not None:
            if num_candidates != 1:
                raise ValueError(f"prior_latents: the prior draws {num_candidates} candidates per image "
                                 "(config.diffusion.num_candidates); initial noise is taken with 1 only")
            x_T = pad_rows(np.asarray(x_T, np.float32), rows)
        clip_range = config_get(config, "diffusion.clip_range")
        return prior_lib.sample_image_embeddings_jit(
            stage.module, stage.variables, self._key(seed, stage), text_embed=text_embed, text_encodings=encodings,
            text_mask=mask, schedule=self._schedule_for(stage, steps, prior_sampler), steps=steps,
            sampler=prior_sampler, guidance_scale=None if scale == 1.0 else scale,
            num_candidates=num_candidates, eta=float(config_get(config, "diffusion.eta", 0.0)),
            null_text=null_text, clip_range=None if clip_range is None else float(clip_range), x_T=x_T)[:count]

    def _sample_ar_prior(self, text_embed, encodings, mask, seed: int, guidance_scale) -> jax.Array:
        """The autoregressive prior's samples; its settings are the stage config's `sampling` section."""
        stage, config = self.prior, self.prior.config
        scale = check_scale(config_get(config, "sampling.guidance_scale", 1.0) if guidance_scale is None
                            else guidance_scale, "prior_guidance_scale")
        return ar_prior_lib.sample_image_embeddings_jit(
            stage.module, stage.variables, self._key(seed, stage), text_embed=text_embed, text_encodings=encodings,
            text_mask=mask, temperature=float(config_get(config, "sampling.temperature", 1.0)),
            top_p=float(config_get(config, "sampling.top_p", 1.0)), guidance_scale=None if scale == 1.0 else scale,
            num_candidates=int(config_get(config, "sampling.num_candidates", 1)))

    def _decoder_text(self, text, batch: int) -> dict:
        """The decoder's text kwargs: the caption's encodings, or without a caption a dropped
        full-length stand-in (the compiled program of captioned decoding is reused)."""
        module = self.decoder.module
        out = {}
        if text is None:
            if module.use_text_encodings:
                length, width = int(self.decoder.config.conditioning.text_len), self.clip.module.text_width
                out.update(text_encodings=jnp.zeros((batch, length, width), jnp.float32),
                           text_mask=jnp.ones((batch, length), bool))
            if module.use_text_embed:
                out["text_embed"] = jnp.zeros((batch, int(self.decoder.config.conditioning.image_embed_dim)),
                                              jnp.float32)
            return {**out, "drop_text": True} if out else {}
        text_embed, encodings, mask = text
        if module.use_text_encodings:
            out.update(text_encodings=encodings, text_mask=mask)
        if module.use_text_embed:
            out["text_embed"] = text_embed
        return out

    def _decoder_options(self, *, sampler=None, eta=None, clip_denoised=None) -> dict:
        config = self.decoder.config
        return dict(
            sampler=self._sampler(self.decoder, sampler),
            eta=float(config_get(config, "diffusion.eta", 0.0) if eta is None else eta),
            objective=config_get(config, "diffusion.objective", "eps"),
            clip_denoised=bool(config_get(config, "diffusion.clip_denoised", True) if clip_denoised is None
                               else clip_denoised))

    def _decode(self, image_embed, text, x_T, seed: int, *, steps: int, guidance_scale: float, **options):
        """Decoder samples in [-1, 1] from x_T (B, S, S, C); text None = no caption."""
        stage = self.decoder
        self._report("decoder")
        options = self._decoder_options(**options)
        return sampling.decode_images(
            stage.module, stage.variables, self._key(seed, stage), **self._decoder_text(text, x_T.shape[0]),
            image_embed=image_embed if stage.module.use_image_embed else None,
            schedule=self._schedule_for(stage, steps, options["sampler"]), steps=steps,
            guidance_scale=guidance_scale, x_T=x_T, image_size=stage.module.image_size, **options)

    def _invert(self, images_float, image_embed, steps: int) -> jax.Array:
        """The decoder's DDIM inversion of [-1, 1] images at its size, without a caption."""
        stage = self.decoder
        self._report("invert")
        return sampling.invert_images(
            stage.module, stage.variables, images_float, **self._decoder_text(None, images_float.shape[0]),
            image_embed=image_embed if stage.module.use_image_embed else None,
            schedule=self._schedule_for(stage, steps), steps=steps,
            objective=config_get(stage.config, "diffusion.objective", "eps"),
            fixed_point_iters=INVERSION_FIXED_POINT_ITERS)

    def _upsample(self, images, seed: int, steps: list[int], *, known=None, frames: bool = False,
                  x_T_first=None, sampler=None) -> jax.Array:
        """Run the upsamplers on [-1, 1] images. `known` = (uint8 image, bool mask) restores the
        known pixels after every stage. `frames`: one x_T for all rows and a deterministic sampler
        (DDIM with eta 0 in place of a stochastic one), so that frames of an interpolation differ
        only where their low-res inputs do. `x_T_first`: the first upsampler's initial noise
        (diffusers' super_res_latents)."""
        for index, (stage, stage_steps) in enumerate(zip(self.upsamplers, steps)):
            size = stage.module.image_size
            config = stage.config
            self._report(stage.name)
            batch = images.shape[0]
            x_T = initial_noise(seed, "upsampler", (1 if frames else batch, size, size, stage.module.out_channels), index)
            if index == 0 and x_T_first is not None:
                x_T = x_T_first
            variables = stage.variables
            last_step = None
            if has_last_step_model(stage):
                variables = {"params": stage.variables["params"]}
                last_step = {"params": stage.variables["last_step_params"]}
            stage_sampler = self._sampler(stage, sampler, deterministic=frames)
            images = sampling.upsample_images(
                stage.module, variables, self._key(seed, stage), images, last_step_params=last_step,
                schedule=self._schedule_for(stage, stage_steps, stage_sampler), steps=stage_steps,
                sampler=stage_sampler,
                eta=0.0 if frames else float(config_get(config, "diffusion.eta", 0.0)),
                x_T=np.broadcast_to(x_T, (batch, *x_T.shape[1:])),
                objective=config_get(config, "diffusion.objective", "eps"),
                clip_denoised=bool(config_get(config, "diffusion.clip_denoised", True)),
                residual=bool(config_get(config, "diffusion.residual", False)))
            if known is not None:
                image, mask = known
                replace = square_mask(mask, size)[None, :, :, None]
                images = jnp.where(replace, images, to_float(square_image(image, size))[None])
        return images

    def _decoder_noise(self, seed: int, batch: int, purpose: str = "decoder") -> np.ndarray:
        module = self.decoder.module
        return initial_noise(seed, purpose, (batch, module.image_size, module.image_size, module.out_channels))
