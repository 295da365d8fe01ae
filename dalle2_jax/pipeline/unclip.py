"""UnCLIP inference: generate, variations, interpolate, text_diff and inpaint over the trained stages.

  pipe = UnCLIPPipeline.from_pretrained("runs/demo/pipeline")
  images = pipe.generate(["a red circle"], seed=0, num_images_per_prompt=2)   # uint8 (2, H, W, 3)

A pipeline directory holds `pipeline.json` (format, version, the stages in order) and one
subdirectory per stage: `config.json` (the stage's full training config) and `params/` (its
EMA parameters, Orbax); the CLIP stage also holds `tokenizer/`. Stages: "clip", "prior",
"decoder", then zero or more upsamplers ("upsampler", "upsampler_1", ...) in resolution order.

Every stage runs as one jitted program (CLIP text and image towers, the prior with best-of-k
reranking, the decoder, each upsampler); prompts are batched. Random draws come from the seed
alone: initial noise from NumPy's PCG64 seeded with (seed, purpose), sampler noise from
`fold_in(key(seed), stage)`, so the same seed and arguments give the same uint8 images.
Inputs: uint8 arrays (H, W, 3) / (N, H, W, 3), PIL images or paths; non-square images are
centre-cropped. Outputs: uint8 (N, H, W, 3) at the last stage's resolution.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle2_jax import diffusion, sampling
from dalle2_jax.models.clip import normalize
from dalle2_jax.pipeline.inputs import (check_caption, check_count, check_prompts, check_scale, check_seed,
                                        load_images, load_mask, one_image, slerp, square_image, square_mask,
                                        to_float, to_uint8)
from dalle2_jax.pipeline.stages import (CORE_STAGES, REQUIRED_STAGES, STAGE_NAME, Stage, abstract_variables,
                                        build_module, check_variables, config_get, prior_uses_text_encodings,
                                        random_variables, stage_schedule)
from dalle2_jax.pipeline.runs import StageRuns, check_sampler_argument
from dalle2_jax.pipeline.storage import read_pipeline_dir, write_pipeline_dir
from dalle2_jax.tokenizer import Tokenizer

INVERTED_ETA = 0.5  # DDIM eta of variations decoded from the image's own x_T (eta 0 reconstructs it)
MAX_TEXT_DIFF_THETA = 0.5  # the paper's text diffs go up to theta in [0.25, 0.5]


def _check_latents(latents, shape: tuple, name: str):
    if latents is None:
        return None
    if np.shape(latents) != tuple(shape):
        raise ValueError(f"{name}: expected float noise of shape {tuple(shape)}, got {np.shape(latents)}")
    return np.asarray(latents, np.float32)



class UnCLIPPipeline(StageRuns):
    """CLIP + diffusion prior + decoder + upsamplers; see the module docstring.

    `stage_callback(name)`, when set, is called as each stage starts (for progress displays).
    """

    def __init__(self, stages: Sequence[Stage], tokenizer: Tokenizer):
        names = [stage.name for stage in stages]
        unknown = [name for name in names if not STAGE_NAME.fullmatch(name)]
        missing = [name for name in CORE_STAGES if name not in names]
        if unknown or missing or len(set(names)) != len(names):
            raise ValueError(f"stages: expected {list(CORE_STAGES)}, an optional 'prior' and optional upsamplers "
                             f"('upsampler', 'upsampler_1', ...) once each, got {names}")
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer: expected a dalle2_jax.tokenizer.Tokenizer, got {type(tokenizer).__name__}")
        for stage in stages:
            check_variables(stage)
        # On the device once, not with every call.
        by_name = {stage.name: dataclasses.replace(stage, variables=jax.device_put(stage.variables))
                   for stage in stages}
        self.clip, self.prior, self.decoder = by_name["clip"], by_name.get("prior"), by_name["decoder"]
        self.upsamplers = [by_name[name] for name in names if by_name[name].kind == "upsampler"]
        self.tokenizer = tokenizer
        self.stage_callback: Callable[[str], None] | None = None
        self._check_chain()
        self._schedules = {stage.name: stage_schedule(stage) for stage in self.stages if stage.kind != "clip"}
        self._respaced: dict[tuple[str, int], diffusion.DiffusionSchedule] = {}

    @property
    def stages(self) -> list[Stage]:
        return [self.clip, *([self.prior] if self.prior is not None else []), self.decoder, *self.upsamplers]

    @property
    def unit_embeddings(self) -> bool:
        """Whether the stages take unit-norm CLIP embeddings (trained here) or CLIP's raw projections
        (imported Karlo: its prior, text_proj and decoder were trained on those)."""
        return config_get(self.clip.config, "embeddings", "unit") != "unnormalized"

    def _require_prior(self, operation: str) -> Stage:
        if self.prior is None:
            raise ValueError(f"{operation}: this pipeline has no prior (an image-variations model); {operation} "
                             "needs one to turn a caption into an image embedding")
        return self.prior

    @property
    def image_size(self) -> int:
        """The resolution of the outputs: the last stage's."""
        return int((self.upsamplers[-1] if self.upsamplers else self.decoder).module.image_size)

    @property
    def clip_load_size(self) -> int:
        """The square size images are brought to on the host before CLIP (its training data's)."""
        return int(config_get(self.clip.config, "data.image_size", self.clip.module.image_size))

    def _check_chain(self) -> None:
        clip, decoder = self.clip.module, self.decoder.module
        if self.tokenizer.context_length != clip.context_length:
            raise ValueError(f"tokenizer: context_length {self.tokenizer.context_length} differs from the CLIP "
                             f"model's {clip.context_length}")
        if self.prior is not None:
            self._check_prior(clip, self.prior.module)
        self._check_decoder(clip, decoder)

    def _check_prior(self, clip, prior) -> None:
        if prior.embed_dim != clip.embed_dim:
            raise ValueError(f"prior: embed_dim {prior.embed_dim} differs from the CLIP embedding size "
                             f"{clip.embed_dim}")
        if prior_uses_text_encodings(self.prior.config) and (
                prior.text_encoding_dim != clip.text_width or prior.max_text_len < clip.context_length):
            raise ValueError(f"prior: text encodings ({prior.max_text_len}, {prior.text_encoding_dim}) do not hold "
                             f"CLIP's ({clip.context_length}, {clip.text_width})")

    def _check_decoder(self, clip, decoder) -> None:
        if decoder.use_low_res or not (decoder.use_image_embed or decoder.use_text_encodings):
            raise ValueError("decoder: expected a UNet conditioned on the CLIP image embedding and/or text")
        cond = self.decoder.config.conditioning
        if decoder.use_image_embed and int(cond.image_embed_dim) != clip.embed_dim:
            raise ValueError(f"decoder: conditioning.image_embed_dim {cond.image_embed_dim} differs from the CLIP "
                             f"embedding size {clip.embed_dim}")
        if decoder.use_text_encodings and int(cond.text_width) != clip.text_width:
            raise ValueError(f"decoder: conditioning.text_width {cond.text_width} differs from CLIP's text width "
                             f"{clip.text_width}")
        size = decoder.image_size
        for stage in self.upsamplers:
            low_res_size = int(config_get(stage.config, "low_res_size", 0))
            if not stage.module.use_low_res or low_res_size != size or stage.module.image_size <= size:
                raise ValueError(f"{stage.name}: expected an upsampler from {size}px (config.low_res_size "
                                 f"{low_res_size}, model.image_size {stage.module.image_size})")
            size = stage.module.image_size

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_configs(cls, configs: Mapping[str, Any], *, tokenizer, seed: int = 0) -> "UnCLIPPipeline":
        """A randomly initialised pipeline (see `random_variables`) from stage configs.

        configs: {"clip": ..., "prior": ..., "decoder": ..., "upsampler": one config or a list}
        (copied, not changed). As the training tasks do, prior sizes left None and the decoder's
        `conditioning` come from the CLIP config. tokenizer: a Tokenizer or its directory.
        """
        seed = check_seed(seed)
        if not isinstance(configs, Mapping):
            raise ValueError(f"configs: expected a mapping of stage name to config, got {type(configs).__name__}")
        missing = [name for name in REQUIRED_STAGES if name not in configs]
        if missing:
            raise ValueError(f"configs: expected the stages {REQUIRED_STAGES} (and optional 'upsampler'), "
                             f"missing {missing}")
        tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_dir(tokenizer)
        copy = lambda config: ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict")  # noqa: E731
                                                        else dict(config))
        named = [(name, copy(configs[name])) for name in REQUIRED_STAGES]
        upsamplers = configs.get("upsampler", configs.get("upsamplers", ()))
        upsamplers = [upsamplers] if not isinstance(upsamplers, (list, tuple)) else list(upsamplers)
        named += [("upsampler" if i == 0 else f"upsampler_{i}", copy(config)) for i, config in enumerate(upsamplers)]

        clip_module = build_module("clip", named[0][1])
        prior_model = named[1][1].model
        for key, value in (("embed_dim", clip_module.embed_dim), ("text_encoding_dim", clip_module.text_width),
                           ("max_text_len", clip_module.context_length)):
            if prior_model.get(key) is None:
                prior_model[key] = int(value)
        named[2][1].conditioning = ml_collections.ConfigDict(dict(
            image_embed_dim=int(clip_module.embed_dim), text_len=int(clip_module.context_length),
            text_width=int(clip_module.text_width)))

        stages = []
        for index, (name, config) in enumerate(named):
            module = build_module(name, config)
            variables = random_variables(abstract_variables(name, module, config), seed * 1000 + index)
            stages.append(Stage(name, config, module, variables))
        return cls(stages, tokenizer)

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> "UnCLIPPipeline":
        """Load a pipeline directory written by `save_pretrained` / `export_pipeline`, or a diffusers
        UnCLIP directory (Karlo; recognised by its model_index.json, see `convert.unclip`).

        dtype: cast an imported model's parameters and compute to it (e.g. "bfloat16")."""
        from dalle2_jax.convert import unclip as unclip_import

        if unclip_import.is_unclip_dir(path):
            return cls(*unclip_import.read_unclip_dir(path, dtype))
        return cls(*read_pipeline_dir(path, dtype))

    def save_pretrained(self, path) -> None:
        """Write the pipeline directory `path` atomically (a temporary directory beside it, then
        renamed); an existing pipeline directory there is replaced."""
        write_pipeline_dir(path, self.stages, self.tokenizer, self.image_size)

    # -- public API ---------------------------------------------------------------------------

    def encode_text(self, prompts) -> np.ndarray:
        """Unit-norm CLIP text embeddings (N, D) of a caption or a list of captions."""
        return np.asarray(normalize(self._text(check_prompts(prompts))[0]))

    def upsample(self, images, seed: int = 0, *, upsampler_steps=None, sampler=None) -> np.ndarray:
        """The upsamplers alone: uint8 images at the decoder's resolution (arrays, PIL images or
        paths) -> uint8 (N, H, W, 3). With the seed and batch of a `generate` call it upsamples
        that call's decoder images as `generate` does (from their uint8 rounding). sampler: as in
        `generate` (a name, or a dict with an "upsampler" entry)."""
        seed = check_seed(seed)
        up_steps = self._upsampler_steps(upsampler_steps)
        size = int(self.decoder.module.image_size)
        images = load_images(images, "images")
        if any(image.shape[:2] != (size, size) for image in images):
            raise ValueError(f"images: expected ({size}, {size}, 3) images, the decoder's resolution, got "
                             f"{sorted({image.shape for image in images})}")
        return to_uint8(self._upsample(jnp.asarray(to_float(np.stack(images))), seed, up_steps, sampler=sampler))

    def encode_image(self, images) -> np.ndarray:
        """Unit-norm CLIP image embeddings (N, D) of uint8 images, PIL images or paths."""
        return np.asarray(normalize(self._image_embeds(load_images(images, "images"))))

    def generate(self, prompts, seed: int = 0, num_images_per_prompt: int = 1, *, prior_steps: int | None = None,
                 decoder_steps: int | None = None, upsampler_steps=None, prior_guidance_scale: float | None = None,
                 decoder_guidance_scale: float | None = None, prior_latents=None, decoder_latents=None,
                 super_res_latents=None, sampler=None) -> np.ndarray:
        """Text -> images: uint8 (len(prompts) * num_images_per_prompt, H, W, 3), prompt-major.

        Steps, guidance scales and samplers default to each stage's config (diffusion.sampling_steps,
        diffusion.guidance_scale, diffusion.sampler); upsampler_steps is an int or one per upsampler.
        sampler: one of sampling.SAMPLERS ("dpm++2m", "dpm++2m-sde", "dpm++3m", "unipc", "ddim",
        "ddpm") for every stage, or a dict by stage ({"prior": "ddim", "decoder": "dpm++2m"}). As in
        diffusers, the initial noise of each stage may be given: prior_latents (N, D), decoder_latents
        (N, S, S, 3) and super_res_latents (N, S', S', 3) for the first upsampler (NHWC).
        """
        self._require_prior("generate")
        check_sampler_argument(sampler)
        prompts = check_prompts(prompts)
        seed = check_seed(seed)
        per_prompt = check_count(num_images_per_prompt, "num_images_per_prompt")
        decoder_steps = self._steps(self.decoder, decoder_steps, "decoder_steps")
        decoder_scale = self._guidance(self.decoder, decoder_guidance_scale, "decoder_guidance_scale")
        up_steps = self._upsampler_steps(upsampler_steps)
        self._steps(self.prior, prior_steps, "prior_steps")
        self._guidance(self.prior, prior_guidance_scale, "prior_guidance_scale")

        batch = len(prompts) * per_prompt
        prior_latents = _check_latents(prior_latents, (batch, self.prior.module.embed_dim), "prior_latents")
        decoder_latents = self._check_decoder_latents(decoder_latents, batch)
        super_res_latents = self._check_super_res_latents(super_res_latents, batch)

        text = self._text(prompts)
        text = tuple(jnp.repeat(a, per_prompt, axis=0) for a in text)
        image_embed = self._sample_prior(text, seed, prior_steps, prior_guidance_scale,
                                         rows_per_caption=per_prompt, x_T=prior_latents, sampler=sampler)
        x_T = self._decoder_noise(seed, batch) if decoder_latents is None else decoder_latents
        images = self._decode(image_embed, text, x_T, seed, steps=decoder_steps, guidance_scale=decoder_scale,
                              sampler=sampler)
        return to_uint8(self._upsample(images, seed, up_steps, x_T_first=super_res_latents, sampler=sampler))

    def _check_decoder_latents(self, latents, batch: int):
        module = self.decoder.module
        return _check_latents(latents, (batch, module.image_size, module.image_size, module.out_channels),
                              "decoder_latents")

    def _check_super_res_latents(self, latents, batch: int):
        if latents is not None and not self.upsamplers:
            raise ValueError("super_res_latents: this pipeline has no upsampler")
        if latents is None:
            return None
        module = self.upsamplers[0].module
        return _check_latents(latents, (batch, module.image_size, module.image_size, module.out_channels),
                              "super_res_latents")

    def variations(self, image, num_images: int = 4, seed: int = 0, invert: bool = False, *,
                   eta: float | None = None, decoder_steps: int | None = None, upsampler_steps=None,
                   decoder_guidance_scale: float | None = None, decoder_latents=None,
                   super_res_latents=None, sampler=None) -> np.ndarray:
        """Images sharing the CLIP image embedding of `image`: uint8 (num_images, H, W, 3).

        invert=False decodes from fresh noise; invert=True from the image's own DDIM-inverted
        x_T with DDIM eta (default INVERTED_ETA; eta 0 reconstructs the image), as the paper's
        "bipartite representation" (z_i, x_T). No caption: the decoder's text is dropped.
        From the inverted x_T the guidance scale defaults to 1 (the inversion is unguided) and the
        decoder samples with DDIM whatever `sampler` says (as `generate`'s; eta is DDIM's).
        decoder_latents / super_res_latents: the initial noise of the decoder and the first upsampler
        (NHWC, num_images rows), as diffusers' UnCLIPImageVariationPipeline takes them.
        """
        check_sampler_argument(sampler)
        picture = one_image(image, "image")
        num_images = check_count(num_images, "num_images")
        seed = check_seed(seed)
        if not isinstance(invert, bool):
            raise ValueError(f"invert: expected a bool, got {invert!r}")
        steps = self._steps(self.decoder, decoder_steps, "decoder_steps")
        up_steps = self._upsampler_steps(upsampler_steps)
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0):
            raise ValueError(f"eta: expected a float >= 0, got {eta!r}")
        decoder_latents = self._check_decoder_latents(decoder_latents, num_images)
        super_res_latents = self._check_super_res_latents(super_res_latents, num_images)
        if invert and decoder_latents is not None:
            raise ValueError("decoder_latents: not with invert=True (the decoder starts from the image's own x_T)")
        image_embed = jnp.repeat(self._image_embeds([picture]), num_images, axis=0)
        if invert:
            scale = check_scale(1.0 if decoder_guidance_scale is None else decoder_guidance_scale,
                                 "decoder_guidance_scale")
            x_T = self._invert(self._decoder_input(picture), image_embed[:1], steps)
            x_T = jnp.repeat(x_T, num_images, axis=0)
            images = self._decode(image_embed, None, x_T, seed, steps=steps, guidance_scale=scale, sampler="ddim",
                                  eta=INVERTED_ETA if eta is None else float(eta), clip_denoised=False)
        else:
            scale = self._guidance(self.decoder, decoder_guidance_scale, "decoder_guidance_scale")
            x_T = self._decoder_noise(seed, num_images) if decoder_latents is None else decoder_latents
            images = self._decode(image_embed, None, x_T, seed, steps=steps, guidance_scale=scale, eta=eta,
                                  sampler=sampler)
        return to_uint8(self._upsample(images, seed, up_steps, x_T_first=super_res_latents, sampler=sampler))

    def _decoder_input(self, picture: np.ndarray) -> np.ndarray:
        return to_float(square_image(picture, self.decoder.module.image_size))[None]

    def _check_frames(self, num_frames) -> int:
        return check_count(num_frames, "num_frames", minimum=2)

    def interpolate(self, image_a, image_b, num_frames: int = 5, seed: int = 0, slerp_noise: bool = False, *,
                    decoder_steps: int | None = None, upsampler_steps=None,
                    decoder_guidance_scale: float | None = None, sampler=None) -> np.ndarray:
        """Frames decoding slerp(z_a, z_b, theta), theta = linspace(0, 1, num_frames): uint8
        (num_frames, H, W, 3). A deterministic sampler (`sampler`'s, DDIM eta 0 in place of a
        stochastic one) from one x_T shared by all frames, or with slerp_noise=True DDIM from the
        slerp of the two images' inverted x_T (guidance then defaults to 1)."""
        check_sampler_argument(sampler)
        picture_a, picture_b = one_image(image_a, "image_a"), one_image(image_b, "image_b")
        num_frames = self._check_frames(num_frames)
        seed = check_seed(seed)
        if not isinstance(slerp_noise, bool):
            raise ValueError(f"slerp_noise: expected a bool, got {slerp_noise!r}")
        steps = self._steps(self.decoder, decoder_steps, "decoder_steps")
        up_steps = self._upsampler_steps(upsampler_steps)
        thetas = np.linspace(0.0, 1.0, num_frames)
        embeds = np.asarray(self._image_embeds([picture_a, picture_b]))
        frames = slerp(embeds[0], embeds[1], thetas)
        if slerp_noise:
            scale = check_scale(1.0 if decoder_guidance_scale is None else decoder_guidance_scale,
                                 "decoder_guidance_scale")
            pictures = np.concatenate([self._decoder_input(picture_a), self._decoder_input(picture_b)])
            inverted = np.asarray(self._invert(pictures, embeds, steps))
            x_T, clip_denoised = slerp(inverted[0], inverted[1], thetas), False
        else:
            scale = self._guidance(self.decoder, decoder_guidance_scale, "decoder_guidance_scale")
            x_T = np.repeat(self._decoder_noise(seed, 1, "interpolate"), num_frames, axis=0)
            clip_denoised = None
        decoder_sampler = "ddim" if slerp_noise else self._sampler(self.decoder, sampler, deterministic=True)
        images = self._decode(jnp.asarray(frames), None, x_T, seed, steps=steps, guidance_scale=scale,
                              sampler=decoder_sampler, eta=0.0, clip_denoised=clip_denoised)
        return to_uint8(self._upsample(images, seed, up_steps, frames=True, sampler=sampler))

    def text_diff(self, image, source_caption: str, target_caption: str, num_frames: int = 5, seed: int = 0, *,
                  max_theta: float = MAX_TEXT_DIFF_THETA, decoder_steps: int | None = None, upsampler_steps=None,
                  decoder_guidance_scale: float | None = None, sampler=None) -> np.ndarray:
        """Text diffs (paper, section 3.3): z_d = normalize(z_t(target) - z_t(source)); frame k decodes
        slerp(z_i, z_d, theta_k), theta = linspace(0, max_theta, num_frames), with DDIM eta 0 from the
        image's inverted x_T (frame 0 reconstructs the image). uint8 (num_frames, H, W, 3).
        `sampler` applies to the upsamplers (deterministic ones; the decoder stays DDIM)."""
        self._require_prior("text_diff")
        check_sampler_argument(sampler)
        picture = one_image(image, "image")
        source = check_caption(source_caption, "source_caption")
        target = check_caption(target_caption, "target_caption")
        num_frames = self._check_frames(num_frames)
        seed = check_seed(seed)
        max_theta = check_scale(max_theta, "max_theta")
        if not 0.0 < max_theta <= 1.0:
            raise ValueError(f"max_theta: expected a fraction in (0, 1], got {max_theta}")
        steps = self._steps(self.decoder, decoder_steps, "decoder_steps")
        up_steps = self._upsampler_steps(upsampler_steps)
        scale = check_scale(1.0 if decoder_guidance_scale is None else decoder_guidance_scale,
                             "decoder_guidance_scale")
        text_embeds = np.asarray(self._text([source, target])[0], np.float64)
        diff = text_embeds[1] - text_embeds[0]
        if np.linalg.norm(diff) < 1e-6:
            raise ValueError("target_caption: expected a caption whose CLIP embedding differs from "
                             f"source_caption's, got {target!r} and {source!r}")
        image_embed = np.asarray(self._image_embeds([picture]))
        frames = slerp(image_embed[0], diff / np.linalg.norm(diff), np.linspace(0.0, max_theta, num_frames))
        x_T = np.asarray(self._invert(self._decoder_input(picture), image_embed, steps))
        images = self._decode(jnp.asarray(frames), None, np.repeat(x_T, num_frames, axis=0), seed, steps=steps,
                              guidance_scale=scale, sampler="ddim", eta=0.0, clip_denoised=False)
        return to_uint8(self._upsample(images, seed, up_steps, frames=True, sampler=sampler))

    def inpaint(self, image, mask, prompt: str, seed: int = 0, num_images: int = 1, *,
                prior_steps: int | None = None, decoder_steps: int | None = None, upsampler_steps=None,
                prior_guidance_scale: float | None = None, decoder_guidance_scale: float | None = None,
                jump_length: int = 10, jump_n_sample: int = 2, sampler=None) -> np.ndarray:
        """Regenerate the masked region (True / nonzero = replace) for `prompt`: uint8
        (num_images, H, W, 3) at the last stage's resolution.

        The decoder resamples the region with RePaint (known pixels re-noised from the image at
        every step, `jump_n_sample - 1` resampling jumps of `jump_length` steps) conditioned on the
        prior's embedding for the prompt; each upsampler's output gets the known pixels back, and
        at the end they are the input's (centre-cropped and resized to the output size) exactly.
        A decoder sampler named in `sampler` other than "ddpm" replaces RePaint: it samples with the
        known pixels re-noised to each level it reaches (no jumps); prior and upsamplers as `generate`.
        """
        self._require_prior("inpaint")
        check_sampler_argument(sampler)
        picture = one_image(image, "image")
        region = load_mask(mask, "mask", picture.shape[:2])
        prompt = check_caption(prompt, "prompt")
        if not region.any():
            raise ValueError("mask: expected at least one pixel to replace (True / nonzero), got an empty mask")
        seed = check_seed(seed)
        num_images = check_count(num_images, "num_images")
        jump_length = check_count(jump_length, "jump_length")
        jump_n_sample = check_count(jump_n_sample, "jump_n_sample")
        steps = self._steps(self.decoder, decoder_steps, "decoder_steps")
        scale = self._guidance(self.decoder, decoder_guidance_scale, "decoder_guidance_scale")
        up_steps = self._upsampler_steps(upsampler_steps)
        self._steps(self.prior, prior_steps, "prior_steps")
        self._guidance(self.prior, prior_guidance_scale, "prior_guidance_scale")

        text = tuple(jnp.repeat(a, num_images, axis=0) for a in self._text([prompt]))
        image_embed = self._sample_prior(text, seed, prior_steps, prior_guidance_scale, argument="prompt",
                                         sampler=sampler)
        stage = self.decoder
        size = stage.module.image_size
        known = np.repeat(to_float(square_image(picture, size))[None], num_images, axis=0)
        decoder_mask = np.repeat(square_mask(region, size)[None], num_images, axis=0)
        named = sampler.get("decoder") if isinstance(sampler, Mapping) else sampler
        options = self._decoder_options(sampler=named or "ddpm")  # RePaint unless a sampler is named
        del options["eta"]
        self._report("decoder")
        images = sampling.inpaint_images(
            stage.module, stage.variables, self._key(seed, stage), known, decoder_mask,
            image_embed=image_embed if stage.module.use_image_embed else None, **self._decoder_text(text, num_images),
            schedule=self._schedule_for(stage, steps, options["sampler"]), steps=steps, guidance_scale=scale,
            jump_length=jump_length, jump_n_sample=jump_n_sample, x_T=self._decoder_noise(seed, num_images, "inpaint"),
            **options)
        images = to_uint8(self._upsample(images, seed, up_steps, known=(picture, region), sampler=sampler))
        full = self.image_size
        replace = square_mask(region, full)[None, :, :, None]
        return np.where(replace, images, square_image(picture, full)[None])
