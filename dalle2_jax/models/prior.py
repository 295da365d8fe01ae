"""The unCLIP diffusion prior: a causal transformer from a caption to a CLIP image embedding.

The sequence is [projected text token encodings (L), CLIP text embedding z_t,
timestep embedding, noised image embedding z_i^(t), learned final query]; the
output at the final query, after a final LayerNorm, is projected to the CLIP
embedding size. With `objective="x0"` it predicts the clean z_i (Ramesh et al.
2022, section 2.2). Layout and parameter names follow diffusers'
`PriorTransformer` (Karlo), so its weights map onto this module one to one.

Embeddings live on the prior's scale inside the diffusion process: unit norm
times `embed_scale` (`to_prior_scale`); samples go back to CLIP's unit norm.
Karlo's prior (`embed_norm="clip_mean_std"`) instead standardises them with learned
`clip_mean`/`clip_std` and samples come back unnormalised; it also takes the raw z_t
(`normalize_text_embed=False`), guides against the empty caption instead of learned null
text (`learned_null_text=False`) and masks padded text keys by adding -10000
(`attention_mask_value`), as diffusers' PriorTransformer.
`sample_image_embeddings` draws k candidates per caption with guidance and keeps
the one closest to z_t; `prior_loss` is the training objective.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion

OBJECTIVES = ("x0", "eps", "v")
SAMPLERS = diffusion.SAMPLERS
EMBED_NORMS = ("unit", "clip_mean_std")
# Tokens after the text tokens: z_t, timestep, noised z_i, final query.
NUM_EXTRA_TOKENS = 4

_LAYER_NORM_EPS = 1e-5  # PyTorch's default, so imported weights match exactly.


def to_prior_scale(embed: jax.Array, embed_scale: float) -> jax.Array:
    """Unit-normalise CLIP embeddings `(..., D)` and scale them to the prior's norm."""
    embed = embed.astype(jnp.float32)
    return embed * (embed_scale * jax.lax.rsqrt(jnp.sum(embed**2, -1, keepdims=True) + 1e-12))


def from_prior_scale(embed: jax.Array) -> jax.Array:
    """Prior-scale embeddings back onto CLIP's unit sphere."""
    return to_prior_scale(embed, 1.0)


def cut_text(text_encodings, text_mask, text_len: int):
    """Token encodings (..., L, W) and mask (..., L) cut to their first `text_len` positions, and
    whether each row (the leading axes) had a real token after them. Host (NumPy) arrays."""
    text_encodings, text_mask = np.asarray(text_encodings), np.asarray(text_mask)
    cut_off = text_mask[..., text_len:].any(axis=-1)
    return text_encodings[..., :text_len, :], text_mask[..., :text_len], cut_off


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features `(B, dim)` of timesteps, ordered [cos, sin] as in diffusers."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


class SelfAttention(nn.Module):
    """Multi-head attention of `queries` over `inputs` (after any cached keys/values).

    Returns the output and this call's (keys, values), so a fixed prefix can be cached.
    """

    num_heads: int
    dtype: Any = jnp.float32
    mask_value: float | None = None  # None: masked keys get no weight; a float is added (diffusers: -10000)

    @nn.compact
    def __call__(self, queries, inputs, mask, cached_kv=None):
        width = inputs.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"num_heads: expected a divisor of the width {width}, got {self.num_heads}")
        head_dim = width // self.num_heads
        dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype)
        q = dense(name="to_q")(queries)
        k = dense(name="to_k")(inputs)
        v = dense(name="to_v")(inputs)
        all_k, all_v = (k, v) if cached_kv is None else (
            jnp.concatenate([cached_kv["k"], k], axis=1), jnp.concatenate([cached_kv["v"], v], axis=1))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, all_k).astype(jnp.float32) / math.sqrt(head_dim)
        if self.mask_value is None:
            logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
        else:
            logits = logits + jnp.where(mask[:, None], 0.0, self.mask_value)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, all_v)
        out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="to_out")(out)
        return out, {"k": k, "v": v}


class PriorBlock(nn.Module):
    """Pre-LN transformer block over `x`, attending also to `cached_kv` when given.

    `last_token_only` computes just the final position's output (keys and values
    still come from every position): the prior reads nothing else from its last block.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    mask_value: float | None = None

    @nn.compact
    def __call__(self, x, mask, *, cached_kv=None, last_token_only: bool = False, train: bool = False):
        layer_norm = functools.partial(nn.LayerNorm, epsilon=_LAYER_NORM_EPS, dtype=self.dtype)
        h = layer_norm(name="norm1")(x)
        if last_token_only:
            x, mask = x[:, -1:], mask[:, -1:]
        attended, kv = SelfAttention(self.num_heads, dtype=self.dtype, mask_value=self.mask_value, name="attn1")(
            h[:, -x.shape[1]:], h, mask, cached_kv)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(attended)

        h = layer_norm(name="norm3")(x)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="ff_in")(h)
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(x.shape[-1], dtype=self.dtype, name="ff_out")(h)
        return x + nn.Dropout(self.dropout, deterministic=not train)(h), kv


def _causal_mask(key_is_real: jax.Array, num_queries: int) -> jax.Array:
    """(B, Tq, Tk) mask for the last `num_queries` positions of a causal sequence of Tk keys."""
    num_keys = key_is_real.shape[1]
    causal = jnp.tril(jnp.ones((num_keys, num_keys), bool))[num_keys - num_queries:]
    return causal[None] & key_is_real[:, None, :]


class DiffusionPrior(nn.Module):
    """Denoiser of prior-scale image embeddings conditioned on a caption.

    `model.apply(params, x, t, text_embed=..., text_encodings=..., text_mask=...,
    drop_text=...)` is a denoiser in `dalle2_jax.diffusion`'s sense: `t` holds
    original training timesteps and the output has the shape of `x`. `text_embed`
    is on CLIP's scale; `x` on the prior's (`to_prior_scale`).

    Under the causal mask the text tokens and z_t never see the timestep or z_i^(t),
    so sampling encodes them once (`encode_text`) and each step runs only the last
    three tokens against that cache (`denoise`); the result equals `__call__`.
    """

    embed_dim: int = 512  # CLIP embedding size D
    text_encoding_dim: int = 512  # width W of the CLIP text token encodings
    max_text_len: int = 77
    width: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    time_embed_dim: int | None = None  # hidden size of the timestep MLP; None: width
    dropout: float = 0.0
    embed_scale: float | None = None  # None: sqrt(embed_dim)
    objective: str = "x0"
    embed_norm: str = "unit"  # "clip_mean_std": (z_i - clip_mean) / clip_std, learned (Karlo)
    normalize_text_embed: bool = True  # False: z_t enters as given (Karlo: unnormalised)
    learned_null_text: bool = True  # False: guidance uses the empty caption's text (Karlo)
    attention_mask_value: float | None = None  # diffusers adds -10000 on masked keys
    dtype: Any = "float32"

    @property
    def scale(self) -> float:
        """The norm of embeddings on the prior's scale."""
        return float(self.embed_scale) if self.embed_scale is not None else math.sqrt(self.embed_dim)

    # Two entry points share the parameters, hence setup() rather than @nn.compact.
    def setup(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.embed_norm not in EMBED_NORMS:
            raise ValueError(f"embed_norm: expected one of {EMBED_NORMS}, got {self.embed_norm!r}")
        dtype = jnp.dtype(self.dtype)
        dense = functools.partial(nn.Dense, self.width, dtype=dtype)
        init = nn.initializers.normal(0.02)
        self.encoder_hidden_states_proj = dense()
        self.embedding_proj = dense()
        self.time_embedding_linear_1 = nn.Dense(self.time_embed_dim or self.width, dtype=dtype)
        self.time_embedding_linear_2 = dense()
        self.proj_in = dense()
        self.prd_embedding = self.param("prd_embedding", init, (self.width,))
        if self.learned_null_text:
            # Guidance-free examples see these in place of the text, every position attended.
            self.null_text_encodings = self.param("null_text_encodings", init, (self.max_text_len, self.width))
            self.null_text_embed = self.param("null_text_embed", init, (self.width,))
        if self.embed_norm == "clip_mean_std":
            self.clip_mean = self.param("clip_mean", nn.initializers.zeros, (self.embed_dim,))
            self.clip_std = self.param("clip_std", nn.initializers.ones, (self.embed_dim,))
        # Text positions count from 0 and the extra tokens sit after max_text_len, so
        # shorter padded text gives the same result as the full-length layout.
        self.positional_embedding = self.param(
            "positional_embedding", init, (self.max_text_len + NUM_EXTRA_TOKENS, self.width))
        self.transformer_blocks = [
            PriorBlock(self.num_heads, int(self.mlp_ratio * self.width), dropout=self.dropout, dtype=dtype,
                       mask_value=self.attention_mask_value)
            for _ in range(self.depth)]
        self.norm_out = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=dtype)
        self.proj_to_clip_embeddings = nn.Dense(self.embed_dim, dtype=dtype)

    def __call__(self, noised_image_embed, t, *, text_embed, text_encodings, text_mask,
                 drop_text=None, train: bool = False):
        self._check_text(text_embed, text_encodings, text_mask, drop_text)
        self._check_noised(noised_image_embed, t, text_embed.shape[0])
        text_tokens, text_is_real = self._text_tokens(text_embed, text_encodings, text_mask, drop_text)
        x = jnp.concatenate([text_tokens, self._denoising_tokens(noised_image_embed, t)], axis=1)
        key_is_real = jnp.concatenate([text_is_real, jnp.ones((x.shape[0], 3), bool)], axis=1)
        mask = _causal_mask(key_is_real, x.shape[1])
        for i, block in enumerate(self.transformer_blocks):
            x, _ = block(x, mask, last_token_only=i == self.depth - 1, train=train)
        return self._output(x[:, -1])

    def encode_text(self, text_embed, text_encodings, text_mask, drop_text=None):
        """The per-layer keys/values of the L text tokens and z_t: a pytree with batch first."""
        self._check_text(text_embed, text_encodings, text_mask, drop_text)
        x, text_is_real = self._text_tokens(text_embed, text_encodings, text_mask, drop_text)
        mask = _causal_mask(text_is_real, x.shape[1])
        layers = []
        for block in self.transformer_blocks:
            x, kv = block(x, mask)
            layers.append(kv)
        return {"layers": layers, "text_is_real": text_is_real}

    def denoise(self, noised_image_embed, t, *, text_cache):
        """`__call__` with the text already encoded by `encode_text`."""
        self._check_noised(noised_image_embed, t, text_cache["text_is_real"].shape[0])
        x = self._denoising_tokens(noised_image_embed, t)
        key_is_real = jnp.concatenate([text_cache["text_is_real"], jnp.ones_like(x[:, :, 0], bool)], axis=1)
        mask = _causal_mask(key_is_real, x.shape[1])
        for i, (block, kv) in enumerate(zip(self.transformer_blocks, text_cache["layers"])):
            x, _ = block(x, mask, cached_kv=kv, last_token_only=i == self.depth - 1)
        return self._output(x[:, -1])

    def normalize_embed(self, image_embed):
        """CLIP image embeddings (B, D) -> the space the diffusion runs in."""
        if self.embed_norm == "clip_mean_std":
            return (image_embed.astype(jnp.float32) - self.clip_mean) / self.clip_std
        return to_prior_scale(image_embed, self.scale)

    def unnormalize_embed(self, x):
        """Samples of the diffusion -> CLIP image embeddings (unit norm, or Karlo's unnormalised)."""
        if self.embed_norm == "clip_mean_std":
            return x.astype(jnp.float32) * self.clip_std + self.clip_mean
        return from_prior_scale(x)

    def _text_tokens(self, text_embed, text_encodings, text_mask, drop_text):
        """Text tokens and the z_t token with positions, (B, L + 1, width), and which are real."""
        dtype = jnp.dtype(self.dtype)
        text_len = text_encodings.shape[1]
        tokens = self.encoder_hidden_states_proj(text_encodings.astype(dtype))
        if self.normalize_text_embed:
            text_embed = to_prior_scale(text_embed, self.scale)
        embed_token = self.embedding_proj(text_embed.astype(dtype))
        text_is_real = text_mask.astype(bool)
        if drop_text is not None:
            if not self.learned_null_text:
                raise ValueError("drop_text: this prior has no learned null text (learned_null_text=False); "
                                 "pass the empty caption's text instead")
            drop_text = jnp.asarray(drop_text, bool)
            tokens = jnp.where(drop_text[:, None, None], self.null_text_encodings[:text_len].astype(dtype), tokens)
            embed_token = jnp.where(drop_text[:, None], self.null_text_embed.astype(dtype), embed_token)
            text_is_real = text_is_real | drop_text[:, None]
        tokens = jnp.concatenate([tokens, embed_token[:, None]], axis=1)
        positions = jnp.concatenate([self.positional_embedding[:text_len],
                                     self.positional_embedding[self.max_text_len:self.max_text_len + 1]])
        is_real = jnp.concatenate([text_is_real, jnp.ones_like(text_is_real[:, :1])], axis=1)
        return tokens + positions.astype(dtype), is_real

    def _denoising_tokens(self, noised_image_embed, t):
        """Timestep, noised z_i and final-query tokens with positions, (B, 3, width)."""
        dtype = jnp.dtype(self.dtype)
        batch = noised_image_embed.shape[0]
        time_token = timestep_embedding(jnp.broadcast_to(t, (batch,)), self.width).astype(dtype)
        time_token = self.time_embedding_linear_2(nn.silu(self.time_embedding_linear_1(time_token)))
        image_token = self.proj_in(noised_image_embed.astype(dtype))
        final_query = jnp.broadcast_to(self.prd_embedding.astype(dtype), (batch, self.width))
        tokens = jnp.stack([time_token, image_token, final_query], axis=1)
        return tokens + self.positional_embedding[self.max_text_len + 1:].astype(dtype)

    def _output(self, final_token):
        return self.proj_to_clip_embeddings(self.norm_out(final_token)).astype(jnp.float32)

    def _check_text(self, text_embed, text_encodings, text_mask, drop_text):
        if text_embed.ndim != 2 or text_embed.shape[1] != self.embed_dim:
            raise ValueError(f"text_embed: expected shape (B, {self.embed_dim}), got {text_embed.shape}")
        batch = text_embed.shape[0]
        if (text_encodings.ndim != 3 or text_encodings.shape[0] != batch
                or text_encodings.shape[2] != self.text_encoding_dim
                or not 1 <= text_encodings.shape[1] <= self.max_text_len):
            raise ValueError(
                f"text_encodings: expected shape ({batch}, L, {self.text_encoding_dim}) with "
                f"1 <= L <= max_text_len={self.max_text_len}, got {text_encodings.shape}")
        if text_mask.shape != text_encodings.shape[:2]:
            raise ValueError(f"text_mask: expected shape {text_encodings.shape[:2]}, got {text_mask.shape}")
        if drop_text is not None and jnp.shape(drop_text) != (batch,):
            raise ValueError(f"drop_text: expected a bool array of shape ({batch},), got {jnp.shape(drop_text)}")

    def _check_noised(self, noised_image_embed, t, batch):
        if noised_image_embed.shape != (batch, self.embed_dim):
            raise ValueError(
                f"noised_image_embed: expected shape ({batch}, {self.embed_dim}), got {noised_image_embed.shape}")
        if jnp.shape(t) not in ((), (batch,)):
            raise ValueError(f"t: expected shape ({batch},), got {jnp.shape(t)}")


def _null_text_rows(model: DiffusionPrior, null_text, batch: int, text_len: int):
    """The empty caption's (text_embed, text_encodings, text_mask), checked and broadcast to the batch."""
    if null_text is None or len(null_text) != 3:
        raise ValueError("null_text: a prior without learned null text (learned_null_text=False) needs the empty "
                         "caption's (text_embed, text_encodings, text_mask)")
    embed, encodings, mask = (jnp.asarray(a) for a in null_text)
    shapes = ((model.embed_dim,), (text_len, model.text_encoding_dim), (text_len,))
    out = []
    for name, value, shape in zip(("text_embed", "text_encodings", "text_mask"), (embed, encodings, mask), shapes):
        if value.shape[-len(shape):] != shape or value.ndim not in (len(shape), len(shape) + 1):
            raise ValueError(f"null_text: expected its {name} of shape {shape} or (B, *{shape}), got {value.shape}")
        out.append(jnp.broadcast_to(value, (batch,) + shape))
    return out


def prior_loss(model: DiffusionPrior, params, rng, *, image_embed, text_embed, text_encodings, text_mask,
               schedule: diffusion.DiffusionSchedule, text_drop_prob: float = 0.1, train: bool = True,
               null_text=None):
    """Diffusion loss of a batch of CLIP embeddings: (mean loss, metrics).

    Timesteps, noise and the guidance text drops (probability `text_drop_prob`) are drawn from `rng`.
    A prior without learned null text sees `null_text` (the empty caption's text_embed,
    text_encodings, text_mask) in place of a dropped caption.
    """
    if not 0.0 <= text_drop_prob <= 1.0:
        raise ValueError(f"text_drop_prob: expected a probability in [0, 1], got {text_drop_prob}")
    if image_embed.shape != text_embed.shape:
        raise ValueError(f"image_embed: expected the shape of text_embed {text_embed.shape}, got {image_embed.shape}")
    t_key, noise_key, drop_key, dropout_key = jax.random.split(rng, 4)
    batch = image_embed.shape[0]
    x_start = model.apply(params, image_embed, method="normalize_embed")
    t = jax.random.randint(t_key, (batch,), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x_start.shape)
    x_t = diffusion.q_sample(schedule, x_start, t, noise)
    drop_text = jax.random.bernoulli(drop_key, text_drop_prob, (batch,))
    text = dict(text_embed=text_embed, text_encodings=text_encodings, text_mask=text_mask)
    if model.learned_null_text:
        text["drop_text"] = drop_text
    else:
        null = _null_text_rows(model, null_text, batch, text_encodings.shape[1])
        text = {key: jnp.where(drop_text.reshape((batch,) + (1,) * (value.ndim - 1)), empty.astype(value.dtype),
                               value)
                for (key, value), empty in zip(text.items(), null)}
    prediction = model.apply(params, x_t, schedule.timesteps[t], **text, train=train, rngs={"dropout": dropout_key})
    losses = diffusion.training_losses(schedule, prediction, x_start=x_start, x_t=x_t, t=t, noise=noise,
                                       objective=model.objective)
    metrics = {"loss": jnp.mean(losses["loss"]), "mse": jnp.mean(losses["mse"]),
               "text_drop_rate": jnp.mean(drop_text.astype(jnp.float32))}
    return metrics["loss"], metrics


def rerank_by_similarity(candidates: jax.Array, text_embed: jax.Array) -> jax.Array:
    """Per caption, the candidate `(B, k, D)` with the largest dot product with its unit z_t `(B, D)`."""
    if candidates.ndim != 3 or candidates.shape[::2] != text_embed.shape:
        raise ValueError(f"candidates: expected shape ({text_embed.shape[0]}, k, {text_embed.shape[-1]}) "
                         f"for text_embed of shape {text_embed.shape}, got {candidates.shape}")
    scores = jnp.einsum("bkd,bd->bk", candidates, from_prior_scale(text_embed))
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]


def sample_image_embeddings(model: DiffusionPrior, params, rng, *, text_embed, text_encodings, text_mask,
                            schedule: diffusion.DiffusionSchedule, steps: int = 64, sampler: str = "ddim",
                            guidance_scale: float | None = 4.0, num_candidates: int = 2,
                            eta: float = 0.0, null_text=None, clip_range: float | None = None,
                            x_T=None) -> jax.Array:
    """CLIP image embeddings `(B, D)` for B captions (unit norm; Karlo's: unnormalised).

    Draws `num_candidates` embeddings per caption as one batch of B * k and keeps the one
    closest to z_t (`rerank_by_similarity`). `schedule` is the training schedule, turned here
    into what `sampler` runs on for `steps` (`diffusion.sampler_schedule`; that needs concrete
    arrays: under `jax.jit` pass its result, as `sample_image_embeddings_jit` does). `sampler`:
    one of `diffusion.SAMPLERS` ("dpm++2m": DPM-Solver++ 2M, ...). Classifier-free guidance
    runs the text and null-text halves as one batch; `guidance_scale=None` samples unguided. A
    prior without learned null text is guided against `null_text` (the empty caption's
    text_embed, text_encodings, text_mask). `clip_range` clips the predicted x0 (Karlo: 5; None:
    no clipping). `x_T` (B * num_candidates, D) replaces the initial noise.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates: expected a positive int, got {num_candidates!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    schedule = diffusion.sampler_schedule(schedule, steps, sampler)
    batch = text_embed.shape[0]
    num_samples = batch * num_candidates
    text = [jnp.repeat(a, num_candidates, axis=0) for a in (text_embed, text_encodings, text_mask)]
    denoiser = functools.partial(model.apply, params, method="denoise")
    if guidance_scale is None:
        cond = {"text_cache": model.apply(params, *text, method="encode_text")}
    else:
        # Text and null text are encoded as one batch [cond; uncond], split for the guidance.
        if model.learned_null_text:
            drop_text = jnp.arange(2 * num_samples) >= num_samples
            both = model.apply(params, *[jnp.concatenate([a, a]) for a in text], drop_text,
                               method="encode_text")
        else:
            null = _null_text_rows(model, null_text, num_samples, text_encodings.shape[1])
            both = model.apply(params, *[jnp.concatenate([a, b.astype(a.dtype)]) for a, b in zip(text, null)],
                               method="encode_text")
        cond = {"text_cache": jax.tree.map(lambda a: a[:num_samples], both)}
        uncond = {"text_cache": jax.tree.map(lambda a: a[num_samples:], both)}
        denoiser = diffusion.classifier_free_guidance(denoiser, guidance_scale, uncond=uncond)

    noise_key, sample_key = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(noise_key, (num_samples, model.embed_dim))
    elif jnp.shape(x_T) != (num_samples, model.embed_dim):
        raise ValueError(f"x_T: expected shape ({num_samples}, {model.embed_dim}), got {jnp.shape(x_T)}")
    x_0 = diffusion.run_sampler(sampler, denoiser, x_T, schedule, sample_key, cond=cond, eta=eta,
                                objective=model.objective, clip_denoised=clip_range is not None,
                                clip_range=1.0 if clip_range is None else clip_range)
    candidates = model.apply(params, x_0, method="unnormalize_embed").reshape(batch, num_candidates, model.embed_dim)
    return rerank_by_similarity(candidates, text_embed)


_sample_jitted = jax.jit(sample_image_embeddings,
                         static_argnames=("model", "steps", "sampler", "num_candidates", "eta", "clip_range"))


def sample_image_embeddings_jit(model: DiffusionPrior, params, rng, *, schedule: diffusion.DiffusionSchedule,
                                steps: int = 64, sampler: str = "ddim", **kwargs) -> jax.Array:
    """`sample_image_embeddings` as one compiled program, cached per (model, steps, sampler,
    num_candidates, eta) and input shapes; the guidance scale is traced, so changing it does not
    recompile (None does: it selects the unguided program)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if isinstance(steps, int) and steps >= 1:
        schedule = diffusion.sampler_schedule(schedule, steps, sampler)
    return _sample_jitted(model, params, rng, schedule=schedule, steps=steps, sampler=sampler, **kwargs)
