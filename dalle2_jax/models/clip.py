"""CLIP (Radford et al. 2021): a ViT image encoder and a causal text transformer.

Submodule names follow transformers' `CLIPModel` so that `convert/hf_clip.py`
maps weights by renaming alone. Param layout (Linen names):

  text_model/{token_embedding, position_embedding, encoder/layers_i, final_layer_norm}
  vision_model/{patch_embedding, class_embedding, position_embedding, ln_pre, encoder/layers_i, ln_post}
  text_projection, visual_projection, logit_scale

Typical use:

  model = CLIP(**config.model)
  params = model.init(rng, input_ids, pixel_values)
  text = model.apply(params, input_ids, attention_mask, method=CLIP.encode_text)
  image = model.apply(params, pixel_values, method=CLIP.encode_image)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
TEXT_POOLING = ("eos", "argmax")
TOWERS = ("text", "vision")


@flax.struct.dataclass
class Encoded:
    """One modality's output: projected embeddings (B, D), encodings (B, L, W) and their mask (B, L)."""

    embeds: jax.Array
    encodings: jax.Array
    mask: jax.Array


@flax.struct.dataclass
class CLIPOutput:
    image: Encoded
    text: Encoded
    logits_per_image: jax.Array  # (B_image, B_text)
    logits_per_text: jax.Array  # (B_text, B_image)
    logit_scale: jax.Array  # the learned log scale, unclamped


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def exp_logit_scale(logit_scale: jax.Array, max_scale: float = 100.0) -> jax.Array:
    """exp of the learned log scale, clamped at `max_scale` as in CLIP training."""
    return jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), max_scale)


def normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def clip_contrastive_loss(
    image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array, max_scale: float = 100.0
) -> jax.Array:
    """Symmetric InfoNCE over the batch; pair i is (image i, text i).

    `logit_scale` is the learned log scale (the `logit_scale` param); it is
    exponentiated and clamped here. Embeddings are normalised here.
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            "image_embeds and text_embeds must both be (batch, dim) of equal shape, "
            f"got {image_embeds.shape} and {text_embeds.shape}"
        )
    logits_per_image = exp_logit_scale(logit_scale, max_scale) * (
        normalize(image_embeds) @ normalize(text_embeds).T
    )
    labels = jnp.arange(image_embeds.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits_per_image, labels)
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits_per_image.T, labels)
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (HF layout)."""

    num_heads: int
    in_std: float = 0.02
    out_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        dense = lambda name, std: nn.Dense(  # noqa: E731
            width, dtype=self.dtype, kernel_init=nn.initializers.normal(std), name=name
        )
        split = lambda y: y.reshape(*y.shape[:-1], self.num_heads, head_dim)  # noqa: E731
        q, k, v = (split(dense(name, self.in_std)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        if mask is not None:
            # A finite floor rather than -inf keeps fully masked rows finite.
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return dense("out_proj", self.out_std)(out)


class Mlp(nn.Module):
    mlp_dim: int
    activation: str = "quick_gelu"
    in_std: float = 0.02
    out_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init(self.in_std), name="fc1")(x)
        y = ACTIVATIONS[self.activation](y)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=init(self.out_std), name="fc2")(y)


class EncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    num_heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    depth: int = 12  # of the whole encoder; sets the residual branches' init scale
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        # OpenAI CLIP's init: residual outputs scaled down by sqrt(2 * depth).
        width = x.shape[-1]
        residual_std = width**-0.5 * (2 * self.depth) ** -0.5
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + Attention(self.num_heads, width**-0.5, residual_std, self.dtype, name="self_attn")(y, mask)
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
        mlp = Mlp(self.mlp_dim, self.activation, (2 * width) ** -0.5, residual_std, self.dtype, name="mlp")
        return x + mlp(y)


class Encoder(nn.Module):
    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.depth):
            x = EncoderLayer(
                self.num_heads,
                self.mlp_dim,
                self.activation,
                self.layer_norm_eps,
                self.depth,
                self.dtype,
                name=f"layers_{i}",
            )(x, mask)
        return x


class TextTransformer(nn.Module):
    """Causal text transformer; returns (final-LN hidden states (B, L, W), pooled (B, W))."""

    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    eos_token_id: int
    pooling: str = "eos"
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"input_ids has length {length}, more than context_length {self.context_length}")
        x = nn.Embed(
            self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="token_embedding"
        )(input_ids)
        positions = self.param(
            "position_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
        )
        x = (x + positions[:length]).astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        x = Encoder(
            self.depth, self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, self.dtype, name="encoder"
        )(x, mask)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if self.pooling == "eos":
            # First end-of-text position; the pad token may equal the eos token.
            pool_index = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        elif self.pooling == "argmax":
            # Checkpoints from before transformers#24773 (eos_token_id == 2): eot is the largest id.
            pool_index = jnp.argmax(input_ids, axis=-1)
        else:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLING}, got {self.pooling!r}")
        pooled = jnp.take_along_axis(x, pool_index[:, None, None], axis=1)[:, 0]
        return x, pooled


class VisionTransformer(nn.Module):
    """ViT: bias-free patch conv, class token, ln_pre, encoder, ln_post on the class token."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"pixel_values must be (batch, {self.image_size}, {self.image_size}, 3) NHWC, "
                f"got shape {pixel_values.shape}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        patches = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(pixel_values)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, self.width)
        class_token = self.param("class_embedding", nn.initializers.normal(self.width**-0.5), (self.width,))
        x = jnp.concatenate([jnp.broadcast_to(class_token, (batch, 1, self.width)).astype(patches.dtype), patches], 1)
        positions = self.param("position_embedding", nn.initializers.normal(0.01), (x.shape[1], self.width))
        x = (x + positions).astype(self.dtype)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="ln_pre")(x)
        x = Encoder(
            self.depth, self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, self.dtype, name="encoder"
        )(x)
        pooled = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="ln_post")(x[:, 0])
        return x, pooled


class CLIP(nn.Module):
    """CLIP with a causal text transformer and a ViT image encoder."""

    embed_dim: int = 512
    # Text tower.
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    eos_token_id: int = 49407
    text_pooling: str = "eos"  # "eos": first eos_token_id; "argmax": largest id (legacy eos_token_id == 2)
    # Image tower.
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN
    image_std: Sequence[float] = OPENAI_CLIP_STD
    # Shared.
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    # An imported text encoder alone (Karlo's text-to-image model) has ("text",); the contrastive
    # logit scale exists with both towers.
    towers: Sequence[str] = TOWERS
    # False: the text transformer runs causal attention alone, padding included, as diffusers' UnCLIP
    # pipelines call their text encoder (no attention_mask); real tokens' encodings are the same.
    text_padding_mask: bool = True
    dtype: Any = jnp.float32  # compute dtype (or its name); params stay float32

    def setup(self):
        # setup() (not compact) because encode_text/encode_image are separate entry points.
        _check_activation(self.activation)
        if not self.towers or any(tower not in TOWERS for tower in self.towers):
            raise ValueError(f"towers: expected a non-empty subset of {TOWERS}, got {self.towers!r}")
        dtype = jnp.dtype(self.dtype)  # configs give it as a string
        if "text" in self.towers:
            self._setup_text(dtype)
        if "vision" in self.towers:
            self._setup_vision(dtype)
        if len(set(self.towers)) == 2:
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())

    def _setup_text(self, dtype):
        self.text_model = TextTransformer(
            self.vocab_size,
            self.context_length,
            self.text_width,
            self.text_depth,
            self.text_heads,
            self.text_mlp_dim,
            self.eos_token_id,
            self.text_pooling,
            self.activation,
            self.layer_norm_eps,
            dtype,
        )
        self.text_projection = nn.Dense(
            self.embed_dim,
            use_bias=False,
            dtype=dtype,
            kernel_init=nn.initializers.normal(self.text_width**-0.5),
        )

    def _setup_vision(self, dtype):
        self.vision_model = VisionTransformer(
            self.image_size,
            self.patch_size,
            self.vision_width,
            self.vision_depth,
            self.vision_heads,
            self.vision_mlp_dim,
            self.activation,
            self.layer_norm_eps,
            dtype,
        )
        self.visual_projection = nn.Dense(
            self.embed_dim,
            use_bias=False,
            dtype=dtype,
            kernel_init=nn.initializers.normal(self.vision_width**-0.5),
        )

    def _require(self, tower: str, part: str):
        if tower not in self.towers:
            raise ValueError(f"model: this CLIP has no {tower} tower ({part}); it was loaded with towers "
                             f"{tuple(self.towers)}")

    def encode_text(self, input_ids, attention_mask=None) -> Encoded:
        """input_ids (B, L) int -> Encoded(embeds (B, D), encodings (B, L, text_width), mask (B, L))."""
        self._require("text", "text_encoder")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {input_ids.shape}, got {attention_mask.shape}"
            )
        keys_mask = attention_mask if self.text_padding_mask else jnp.ones_like(attention_mask)
        encodings, pooled = self.text_model(input_ids, keys_mask)
        return Encoded(self.text_projection(pooled), encodings, attention_mask)

    def encode_image(self, pixel_values) -> Encoded:
        """pixel_values (B, H, W, 3), CLIP-normalised -> Encoded(embeds (B, D),
        encodings (B, 1 + num_patches, vision_width), mask of ones)."""
        self._require("vision", "image_encoder")
        encodings, pooled = self.vision_model(pixel_values)
        mask = jnp.ones(encodings.shape[:2], jnp.int32)
        return Encoded(self.visual_projection(pooled), encodings, mask)

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> CLIPOutput:
        text = self.encode_text(input_ids, attention_mask)
        image = self.encode_image(pixel_values)
        scale = exp_logit_scale(self.logit_scale, self.max_logit_scale)
        logits_per_text = scale * (normalize(text.embeds) @ normalize(image.embeds).T)
        return CLIPOutput(image, text, logits_per_text.T, logits_per_text, self.logit_scale)


def preprocess_images(
    images,
    image_size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] NHWC images -> CLIP input (N, image_size, image_size, 3).

    Resizes the short side to `image_size` (bicubic, antialiased), centre-crops,
    and normalises with the CLIP `mean`/`std` (given for [0, 1] pixels).
    """
    images = jnp.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) or (H, W, 3) NHWC, got shape {images.shape}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 entries, got {mean!r} and {std!r}")
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
        images = (images.astype(jnp.float32) + 1.0) / 2.0
    else:
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
    n, height, width, _ = images.shape
    scale = image_size / min(height, width)
    new_h, new_w = max(image_size, round(height * scale)), max(image_size, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = jax.image.resize(images, (n, new_h, new_w, 3), method="bicubic", antialias=True)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    images = images[:, top : top + image_size, left : left + image_size]
    return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
