"""The unCLIP autoregressive prior: a causal transformer from a caption to PCA tokens of z_i.

Ramesh et al. 2022, section 2.2: z_i reduced to its leading principal components, each
quantized into buckets (`models.pca_quantizer`), predicted one token at a time by a decoder-only
transformer over the sequence

  [projected text token encodings (L), z_t, the z_i . z_t token, image token 0, ..., image token K-2]

whose outputs from the z_i . z_t token onwards are the logits of image tokens 0 .. K-1. Text
positions count from 0 and the rest sit after `max_text_len`, so shorter padded text gives the
same result as the full-length layout (as in `models.prior`).

Classifier-free guidance: training replaces the text, z_t and the dot-product token by learned
nulls for a fraction of the examples (the dot product describes the caption, so it goes with
it: the null branch is then p(z_i) alone); sampling runs [cond; uncond] as one batch and mixes
their log-probabilities. Sampling draws the dot-product token from the top half of its
training distribution (equal-mass buckets: the upper half of the tokens), then the K image
tokens in one `lax.scan` over a key/value cache filled by one pass over the prefix.

The fitted PCA + quantizer is the module's "quantizer" variable collection, created by `init`
(as zeros, for shapes) and filled from `PCAQuantizer.as_variables()`; it is not trained.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dalle2_jax.models import pca_quantizer
from dalle2_jax.models.prior import rerank_by_similarity, to_prior_scale

_LAYER_NORM_EPS = 1e-5
_NUM_CONDITION_TOKENS = 2  # z_t and the dot-product token, after the text


class CachedSelfAttention(nn.Module):
    """Multi-head self-attention; with `cache_index` it writes this call's keys/values into a
    "cache" collection of `cache_len` positions at that index and attends over all of them."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, *, cache_index=None, cache_len: int | None = None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"num_heads: expected a divisor of the width {width}, got {self.num_heads}")
        head_dim = width // self.num_heads
        dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype)
        q, k, v = dense(name="query")(x), dense(name="key")(x), dense(name="value")(x)
        if cache_index is not None:
            shape = (x.shape[0], cache_len, self.num_heads, head_dim)
            cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, cache_index, 0, 0))
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, cache_index, 0, 0))
            k, v = cached_k.value, cached_v.value
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class ARPriorBlock(nn.Module):
    """Pre-LN transformer block."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, *, cache_index=None, cache_len=None, train: bool = False):
        layer_norm = functools.partial(nn.LayerNorm, epsilon=_LAYER_NORM_EPS, dtype=self.dtype)
        h = CachedSelfAttention(self.num_heads, dtype=self.dtype, name="attn")(
            layer_norm(name="norm1")(x), mask, cache_index=cache_index, cache_len=cache_len)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(layer_norm(name="norm2")(x))
        h = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(nn.gelu(h, approximate=False))
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class ARPrior(nn.Module):
    """Logits of the PCA image tokens of z_i given a caption; see the module docstring.

    `model.apply(variables, image_tokens, text_embed=..., text_encodings=..., text_mask=...,
    dot_token=..., drop_text=...)`: image_tokens (B, n) int, n <= K - 1, fed after the prefix;
    returns float32 logits (B, n + 1, num_buckets), row j predicting image token j.

    With `decode=True` (and `mutable=["cache"]`) a call with the text fills a key/value cache of
    `cache_len` positions from position 0; a call without the text continues it with more image
    tokens and returns (B, n, num_buckets), the logits after each of them. Both equal `__call__`
    on the whole sequence.
    """

    embed_dim: int = 512  # CLIP embedding size D
    text_encoding_dim: int = 512  # width W of the CLIP text token encodings
    max_text_len: int = 77
    num_components: int = 319  # K: image tokens per embedding
    num_buckets: int = 1024  # per component
    num_dot_buckets: int = 64  # of z_i . z_t
    width: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embed_scale: float | None = None  # the norm z_t is projected at; None: sqrt(embed_dim)
    dtype: Any = "float32"

    @property
    def scale(self) -> float:
        return float(self.embed_scale) if self.embed_scale is not None else math.sqrt(self.embed_dim)

    @nn.compact
    def __call__(self, image_tokens, *, text_embed=None, text_encodings=None, text_mask=None, dot_token=None,
                 drop_text=None, decode: bool = False, cache_len: int | None = None, train: bool = False):
        dtype = jnp.dtype(self.dtype)
        init = nn.initializers.normal(0.02)
        if self.is_initializing():
            for name, shape in pca_quantizer.variable_shapes(self.embed_dim, self.num_components).items():
                self.variable("quantizer", name, jnp.zeros, shape, jnp.float32)
        positions = self.param("positional_embedding", init,
                               (self.max_text_len + _NUM_CONDITION_TOKENS + self.num_components, self.width))
        image_positions = positions[self.max_text_len + _NUM_CONDITION_TOKENS:]
        batch, count = image_tokens.shape
        if count > self.num_components:
            raise ValueError(f"image_tokens: expected at most num_components={self.num_components} tokens, "
                             f"got shape {image_tokens.shape}")
        tokens = nn.Embed(self.num_buckets, self.width, embedding_init=init, name="token_embed")(image_tokens)

        with_text = text_embed is not None
        if with_text:
            self._check_text(text_embed, text_encodings, text_mask, dot_token, drop_text, batch)
            prefix, prefix_is_real = self._prefix(positions, text_embed, text_encodings, text_mask, dot_token,
                                                  drop_text)
            x = jnp.concatenate([prefix, tokens.astype(dtype) + image_positions[:count].astype(dtype)], axis=1)
            is_real = jnp.concatenate([prefix_is_real, jnp.ones((batch, count), bool)], axis=1)
            start = 0
        elif not decode:
            raise ValueError("text_embed: required unless continuing a decode cache (decode=True)")

        if decode:
            if with_text and (cache_len is None or cache_len < x.shape[1]):
                raise ValueError(f"cache_len: expected the cache's length, at least the {x.shape[1]} positions "
                                 f"of this call, got {cache_len!r}")
            if not with_text and not self.has_variable("cache", "index"):
                raise ValueError("decode: no cache to continue; start it with a call that passes the text")
            size = cache_len if with_text else None
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            prefix_len = self.variable("cache", "prefix_len", lambda: jnp.zeros((), jnp.int32))
            key_is_real = self.variable("cache", "key_is_real", jnp.zeros, (batch, size), bool)
            if with_text:
                prefix_len.value = jnp.asarray(prefix.shape[1], jnp.int32)
            else:
                first = index.value - prefix_len.value  # the image-token number of tokens[:, 0]
                x = tokens.astype(dtype) + jax.lax.dynamic_slice_in_dim(image_positions, first, count).astype(dtype)
                is_real = jnp.ones((batch, count), bool)
                start = index.value
            key_is_real.value = jax.lax.dynamic_update_slice(key_is_real.value, is_real, (0, start))
            size = key_is_real.value.shape[1]
            queries = start + jnp.arange(x.shape[1])
            mask = (jnp.arange(size)[None, None, :] <= queries[None, :, None]) & key_is_real.value[:, None, :]
            index.value = start + x.shape[1]
            cache_options = dict(cache_index=start, cache_len=size)
        else:
            length = x.shape[1]
            mask = jnp.tril(jnp.ones((length, length), bool))[None] & is_real[:, None, :]
            cache_options = {}

        for i in range(self.depth):
            x = ARPriorBlock(self.num_heads, int(self.mlp_ratio * self.width), dropout=self.dropout, dtype=dtype,
                             name=f"block_{i}")(x, mask, train=train, **cache_options)
        if with_text:  # outputs from the dot-product token on
            x = x[:, prefix.shape[1] - 1:]
        x = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=dtype, name="norm_out")(x)
        return nn.Dense(self.num_buckets, dtype=dtype, name="head")(x).astype(jnp.float32)

    def _prefix(self, positions, text_embed, text_encodings, text_mask, dot_token, drop_text):
        """[text tokens (L), z_t, dot-product token] with positions, (B, L + 2, width), and which are real."""
        dtype = jnp.dtype(self.dtype)
        init = nn.initializers.normal(0.02)
        text_len = text_encodings.shape[1]
        text = nn.Dense(self.width, dtype=dtype, name="text_proj")(text_encodings.astype(dtype))
        embed = to_prior_scale(text_embed, self.scale).astype(dtype)
        embed = nn.Dense(self.width, dtype=dtype, name="embed_proj")(embed)
        dot = nn.Embed(self.num_dot_buckets, self.width, embedding_init=init, name="dot_embed")(dot_token).astype(dtype)
        null_text = self.param("null_text_encodings", init, (self.max_text_len, self.width))
        null_embed = self.param("null_text_embed", init, (self.width,))
        null_dot = self.param("null_dot", init, (self.width,))
        text_is_real = text_mask.astype(bool)
        if drop_text is not None:
            drop = jnp.asarray(drop_text, bool)
            text = jnp.where(drop[:, None, None], null_text[:text_len].astype(dtype), text)
            embed = jnp.where(drop[:, None], null_embed.astype(dtype), embed)
            dot = jnp.where(drop[:, None], null_dot.astype(dtype), dot)
            text_is_real = text_is_real | drop[:, None]
        prefix_positions = jnp.concatenate([positions[:text_len],
                                            positions[self.max_text_len:self.max_text_len + _NUM_CONDITION_TOKENS]])
        prefix = jnp.concatenate([text, embed[:, None], dot[:, None]], axis=1) + prefix_positions.astype(dtype)
        is_real = jnp.concatenate([text_is_real, jnp.ones((text_is_real.shape[0], _NUM_CONDITION_TOKENS), bool)], 1)
        return prefix, is_real

    def _check_text(self, text_embed, text_encodings, text_mask, dot_token, drop_text, batch):
        if text_embed.shape != (batch, self.embed_dim):
            raise ValueError(f"text_embed: expected shape ({batch}, {self.embed_dim}), got {text_embed.shape}")
        if (text_encodings is None or text_encodings.ndim != 3 or text_encodings.shape[0] != batch
                or text_encodings.shape[2] != self.text_encoding_dim
                or not 1 <= text_encodings.shape[1] <= self.max_text_len):
            raise ValueError(f"text_encodings: expected shape ({batch}, L, {self.text_encoding_dim}) with "
                             f"1 <= L <= max_text_len={self.max_text_len}, got "
                             f"{None if text_encodings is None else text_encodings.shape}")
        if text_mask is None or text_mask.shape != text_encodings.shape[:2]:
            raise ValueError(f"text_mask: expected shape {text_encodings.shape[:2]}, "
                             f"got {None if text_mask is None else text_mask.shape}")
        if dot_token is None or jnp.shape(dot_token) != (batch,):
            raise ValueError(f"dot_token: expected an int array of shape ({batch},), "
                             f"got {None if dot_token is None else jnp.shape(dot_token)}")
        if drop_text is not None and jnp.shape(drop_text) != (batch,):
            raise ValueError(f"drop_text: expected a bool array of shape ({batch},), got {jnp.shape(drop_text)}")


def ar_prior_loss(model: ARPrior, variables, rng, *, image_tokens, dot_token, text_embed, text_encodings,
                  text_mask, text_drop_prob: float = 0.1, train: bool = True):
    """Mean token cross-entropy of teacher-forced image tokens (B, K): (loss, metrics).

    The guidance drops (probability `text_drop_prob`) and dropout are drawn from `rng`.
    """
    if not 0.0 <= text_drop_prob <= 1.0:
        raise ValueError(f"text_drop_prob: expected a probability in [0, 1], got {text_drop_prob}")
    if image_tokens.shape != (text_embed.shape[0], model.num_components):
        raise ValueError(f"image_tokens: expected shape ({text_embed.shape[0]}, {model.num_components}), "
                         f"got {image_tokens.shape}")
    drop_key, dropout_key = jax.random.split(rng)
    drop_text = jax.random.bernoulli(drop_key, text_drop_prob, (text_embed.shape[0],))
    logits = model.apply(variables, image_tokens[:, :-1], text_embed=text_embed, text_encodings=text_encodings,
                         text_mask=text_mask, dot_token=dot_token, drop_text=drop_text, train=train,
                         rngs={"dropout": dropout_key})
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, image_tokens)
    metrics = {"loss": jnp.mean(cross_entropy),
               "token_accuracy": jnp.mean((jnp.argmax(logits, -1) == image_tokens).astype(jnp.float32)),
               "text_drop_rate": jnp.mean(drop_text.astype(jnp.float32))}
    return metrics["loss"], metrics


def top_dot_tokens(rng, batch: int, num_dot_buckets: int) -> jax.Array:
    """Dot-product tokens (B,) drawn uniformly from the top half of the (equal-mass) buckets."""
    return jax.random.randint(rng, (batch,), num_dot_buckets // 2, num_dot_buckets)


def guided_log_probs(logits: jax.Array, guidance_scale: float | None) -> jax.Array:
    """Log-probabilities of the next token; logits of [cond; uncond] when guided:
    cond + (scale - 1) (cond - uncond), which is the conditional exactly at scale 1."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if guidance_scale is None:
        return log_probs
    cond, uncond = jnp.split(log_probs, 2)
    return cond + (guidance_scale - 1.0) * (cond - uncond)


def draw_tokens(rng, log_probs: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Tokens (B,) from log-probabilities (B, V): argmax at temperature 0, else tempered and
    restricted to the smallest set of tokens whose probability reaches top_p (nucleus)."""
    if temperature == 0.0:
        return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    logits = log_probs / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        mass_before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(sorted_logits, -1)
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the top token always stays
        threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_p, num_candidates):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a float >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p!r}")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates: expected a positive int, got {num_candidates!r}")


def sample_tokens(model: ARPrior, variables, rng, *, text_embed, text_encodings, text_mask, dot_token,
                  temperature: float = 1.0, top_p: float = 1.0, guidance_scale: float | None = None) -> jax.Array:
    """Image tokens (B, K) int32: one pass over the prefix fills the key/value cache, then one
    `lax.scan` over the K positions draws a token and feeds it back. Guided: the prefix with the
    text and with the nulls run as one batch [cond; uncond] of 2B rows; both get the drawn token."""
    _check_sampling(temperature, top_p, 1)
    params = {"params": variables["params"]}
    rows = [text_embed, text_encodings, text_mask, dot_token]
    drop_text = None
    if guidance_scale is not None:
        rows = [jnp.concatenate([a, a]) for a in rows]
        drop_text = jnp.arange(rows[0].shape[0]) >= text_embed.shape[0]
    text_embed, text_encodings, text_mask, dot_token = rows
    cache_len = text_encodings.shape[1] + _NUM_CONDITION_TOKENS + model.num_components
    logits, cache = model.apply(params, jnp.zeros((text_embed.shape[0], 0), jnp.int32), text_embed=text_embed,
                                text_encodings=text_encodings, text_mask=text_mask, dot_token=dot_token,
                                drop_text=drop_text, decode=True, cache_len=cache_len, mutable=["cache"])

    def step(carry, key):
        cache, logits = carry
        token = draw_tokens(key, guided_log_probs(logits, guidance_scale), temperature, top_p)
        fed = token if guidance_scale is None else jnp.concatenate([token, token])
        # The last position's feed is not needed; it keeps the loop one uniform step.
        logits, cache = model.apply({**params, **cache}, fed[:, None], decode=True, mutable=["cache"])
        return (cache, logits[:, -1]), token

    _, tokens = jax.lax.scan(step, (cache, logits[:, -1]), jax.random.split(rng, model.num_components))
    return tokens.T


def sample_image_embeddings(model: ARPrior, variables, rng, *, text_embed, text_encodings, text_mask,
                            temperature: float = 1.0, top_p: float = 1.0, guidance_scale: float | None = None,
                            num_candidates: int = 1, dot_tokens=None) -> jax.Array:
    """CLIP image embeddings (B, D), unit norm, for B captions.

    The dot-product token is drawn from the top half of its training distribution unless
    `dot_tokens` (B,) is given. `num_candidates` > 1 samples that many per caption and keeps the
    one closest to z_t (`models.prior.rerank_by_similarity`).
    """
    _check_sampling(temperature, top_p, num_candidates)
    batch = text_embed.shape[0]
    dot_key, token_key = jax.random.split(rng)
    if dot_tokens is None:
        dot_tokens = top_dot_tokens(dot_key, batch * num_candidates, model.num_dot_buckets)
    else:
        if jnp.shape(dot_tokens) != (batch,):
            raise ValueError(f"dot_tokens: expected shape ({batch},), got {jnp.shape(dot_tokens)}")
        dot_tokens = jnp.repeat(jnp.asarray(dot_tokens, jnp.int32), num_candidates)
    text = [jnp.repeat(a, num_candidates, axis=0) for a in (text_embed, text_encodings, text_mask)]
    tokens = sample_tokens(model, variables, token_key, text_embed=text[0], text_encodings=text[1],
                           text_mask=text[2], dot_token=dot_tokens, temperature=temperature, top_p=top_p,
                           guidance_scale=guidance_scale)
    embeds = pca_quantizer.decode_tokens(variables["quantizer"], tokens, model.num_buckets)
    return rerank_by_similarity(embeds.reshape(batch, num_candidates, -1), text_embed)


_sample_jitted = jax.jit(sample_image_embeddings,
                         static_argnames=("model", "temperature", "top_p", "num_candidates"))


def sample_image_embeddings_jit(model: ARPrior, variables, rng, **kwargs) -> jax.Array:
    """`sample_image_embeddings` as one compiled program, cached per (model, temperature, top_p,
    num_candidates) and input shapes; the guidance scale is traced (None selects the unguided one)."""
    return _sample_jitted(model, variables, rng, **kwargs)
