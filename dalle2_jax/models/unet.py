"""ADM/GLIDE UNet: the 64px unCLIP decoder and the super-resolution upsamplers.

One module, `UNet`, configured by its fields (`UNet(**config.model)`):

- decoder: scale-shift (AdaGN) residual blocks, attention at the levels whose
  resolution is in `attention_resolutions`; the CLIP image embedding is
  projected onto the timestep embedding and into `num_context_tokens` extra
  context tokens, the CLIP text token encodings are projected and appended to
  the context, and each attention attends over [context tokens; image tokens]
  (GLIDE's encoder_kv, diffusers' AttnAddedKVProcessor). Learned null values
  replace the image embedding / text where `drop_image` / `drop_text` is set:
  one null context token by default, or with `null_text_tokens` > 0 a stored
  caption encoding (Karlo: CLIP's encoding of the empty caption, which
  diffusers' UnCLIP pipelines use for the unconditional half) that goes through
  the same projection. With `use_text_embed` (Karlo's UnCLIPTextProjModel) the
  pooled text embedding is projected onto the timestep embedding as well.
- upsampler: the same network without attention or CLIP conditioning; its input
  is the noisy image concatenated with the low-resolution image resized to the
  same size, and an optional noise-augmentation level is embedded like the
  timestep. Fully convolutional: trains on crops, samples at full size.

The block structure and submodule names follow diffusers' UNet2DConditionModel
(ResnetDownsampleBlock2D / SimpleCrossAttn*Block2D / UNetMidBlock2DSimpleCrossAttn)
and UNet2DModel, which are ADM's input/middle/output blocks, so public weights
(Karlo) map one to one: `down_blocks_{i}_resnets_{j}`, `..._attentions_{j}`,
`..._downsamplers_0`, `mid_block_*`, `up_blocks_{i}_*` (up block 0 is the
lowest resolution), `conv_in`, `conv_norm_out`, `conv_out`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.models.attention import IMPLEMENTATIONS, dot_product_attention
from dalle2_jax.models.group_norm import GroupNorm

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos3")


def compute_dtype(dtype: Any) -> jnp.dtype:
    """Maps a config value ("float32", "bfloat16", or a dtype) to a jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """ADM sinusoidal embedding, [cos, sin] (diffusers: flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def upsample_nearest_2x(x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def avg_pool_2x(x: Array) -> Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.mean(x, axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")
UPSAMPLE_CONV_IMPLS = ("phases", "direct")

# _PHASE_TAPS[p, a, u] = 1 where tap u of a 3-tap kernel on the 2x nearest-upsampled axis reads
# low-resolution pixel i - 1 + p + a for output pixel 2i + p (phase 0 reads i-1, i; phase 1 i, i+1).
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def _conv_same(x: Array, kernel: Array) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_CONV_DIMS)


def conv_upsampled_3x3(x: Array, kernel: Array) -> Array:
    """`_conv_same(upsample_nearest_2x(x), kernel)` for a 3x3 kernel, at x's resolution.

    Each of the four output phases (even/odd row, even/odd column) sees a 2x2
    neighbourhood of x through a 2x2 kernel whose taps are sums of the 3x3
    kernel's, so the four 2x2 convolutions do 16/36 of the multiply-adds and
    never build the upsampled input. `kernel`'s taps are summed in its own
    dtype, before any cast of x's. Same result up to float rounding.
    """
    b, h, w, _ = x.shape
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"kernel: expected a 3x3 kernel (3, 3, in, out), got shape {kernel.shape}")
    phase_kernels = jnp.einsum("pau,qbv,uvio->pqabio", _PHASE_TAPS, _PHASE_TAPS, kernel).astype(x.dtype)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for py in (0, 1):
        phases = [jax.lax.conv_general_dilated(padded[:, py:py + h + 1, px:px + w + 1], phase_kernels[py, px],
                                               (1, 1), "VALID", dimension_numbers=_CONV_DIMS)
                  for px in (0, 1)]
        rows.append(jnp.stack(phases, axis=3))  # (B, H, W, 2 column phases, out)
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])


class Conv(nn.Module):
    """nn.Conv (stride 1, SAME, odd kernel) with the same parameters.

    `upsample` convolves the 2x nearest-upsampled input instead: "phases" at the
    input's resolution (`conv_upsampled_3x3`; 1x1 kernels convolve, then
    upsample), "direct" by upsampling first; None convolves the input as is.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    upsample: Optional[str] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.upsample is None:
            return _conv_same(x, kernel.astype(self.dtype)) + bias
        if self.upsample not in UPSAMPLE_CONV_IMPLS:
            raise ValueError(f"upsample: expected None or one of {UPSAMPLE_CONV_IMPLS}, got {self.upsample!r}")
        if self.upsample == "direct":
            return _conv_same(upsample_nearest_2x(x), kernel.astype(self.dtype)) + bias
        if (kh, kw) == (1, 1):
            return upsample_nearest_2x(_conv_same(x, kernel.astype(self.dtype)) + bias)
        if (kh, kw) != (3, 3):
            raise ValueError(f"kernel_size: upsample={self.upsample!r} takes 1x1 or 3x3 kernels, "
                             f"got {self.kernel_size}")
        return conv_upsampled_3x3(x, kernel) + bias


class TimeEmbedding(nn.Module):
    """Linear -> SiLU -> Linear over a sinusoidal embedding (diffusers' TimestepEmbedding)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb: Array) -> Array:
        emb = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(emb)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(emb))


class ResBlock(nn.Module):
    """ADM residual block with timestep conditioning; `resample` makes it BigGAN up/down."""

    out_channels: int
    num_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift_norm: bool = True
    dropout: float = 0.0
    resample: str = "none"  # "none" | "up" | "down"
    deterministic: bool = True
    dtype: Any = jnp.float32
    upsample_conv: str = "phases"  # Conv.upsample for conv1 of an "up" block

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        """x: (B, H, W, C); emb: (B, E) time embedding, already passed through SiLU."""
        norm = lambda name: GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype, name=name)
        h = nn.silu(norm("norm1")(x))
        upsample = None
        if self.resample == "up":
            upsample, x = self.upsample_conv, upsample_nearest_2x(x)  # conv1 upsamples h
        elif self.resample == "down":
            h, x = avg_pool_2x(h), avg_pool_2x(x)
        h = Conv(self.out_channels, (3, 3), self.dtype, upsample=upsample, name="conv1")(h)

        emb_features = 2 * self.out_channels if self.scale_shift_norm else self.out_channels
        emb_out = nn.Dense(emb_features, dtype=self.dtype, name="time_emb_proj")(emb)[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm("norm2")(h) * (1 + scale) + shift
        else:
            h = norm("norm2")(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = Conv(self.out_channels, (3, 3), self.dtype, nn.initializers.zeros, name="conv2")(h)

        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (the non-BigGAN downsampling)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        del emb
        return nn.Conv(x.shape[-1], (3, 3), strides=2, padding=1, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest 2x then 3x3 convolution (the non-BigGAN upsampling)."""

    dtype: Any = jnp.float32
    upsample_conv: str = "phases"  # Conv.upsample

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        del emb
        return Conv(x.shape[-1], (3, 3), self.dtype, upsample=self.upsample_conv, name="conv")(x)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the image tokens with extra context keys/values.

    Keys and values are [add_k_proj(context); to_k(image)] as in GLIDE and
    diffusers' AttnAddedKVProcessor; `context_mask` (B, M) masks padded context.
    """

    head_dim: int = 64
    num_heads: int = 0  # > 0 overrides head_dim
    num_groups: int = 32
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    implementation: str = "auto"  # models.attention: "dense", "blocked", "auto" (blocked on CPU)

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None,
                 context_mask: Optional[Array] = None) -> Array:
        b, height, width, channels = x.shape
        heads = self.num_heads if self.num_heads > 0 else channels // self.head_dim
        if heads <= 0 or channels % heads:
            raise ValueError(f"head_dim/num_heads: {channels} channels cannot be split into "
                             f"heads of width {self.head_dim} (num_heads={self.num_heads})")
        head_width = channels // heads
        dense = lambda name, **kw: nn.Dense(channels, dtype=self.dtype, name=name, **kw)

        h = GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="group_norm")(x)
        h = h.reshape(b, height * width, channels)
        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        mask = None
        if context is not None:
            k = jnp.concatenate([dense("add_k_proj")(context), k], axis=1)
            v = jnp.concatenate([dense("add_v_proj")(context), v], axis=1)
            if context_mask is not None:
                image_mask = jnp.ones((b, height * width), bool)
                mask = jnp.concatenate([context_mask.astype(bool), image_mask], axis=1)
        split = lambda a: a.reshape(b, a.shape[1], heads, head_width)
        out = dot_product_attention(split(q), split(k), split(v), mask, implementation=self.implementation)
        out = dense("to_out", kernel_init=nn.initializers.zeros)(out.reshape(b, height * width, channels))
        return x + out.reshape(b, height, width, channels)


_RematResBlock = nn.remat(ResBlock)
_RematAttentionBlock = nn.remat(AttentionBlock)


def _drop_flags(flags: Optional[Array], batch: int, name: str) -> Array:
    if flags is None:
        return jnp.zeros((batch,), bool)
    flags = jnp.asarray(flags)
    if flags.ndim > 1 or (flags.ndim == 1 and flags.shape[0] != batch):
        raise ValueError(f"{name}: expected a bool scalar or shape ({batch},), got shape {flags.shape}")
    return jnp.broadcast_to(flags.astype(bool), (batch,))


class UNet(nn.Module):
    """ADM/GLIDE UNet for the unCLIP decoder and upsamplers (see the module docstring).

    `__call__(x, t, ...)` maps a noisy NHWC image and int (B,) training
    timesteps to the model output: `out_channels` channels, twice that with
    `learned_variance` (prediction first, variance interpolation second).
    """

    image_size: int = 64  # training resolution; places attention by resolution
    out_channels: int = 3
    learned_variance: bool = False
    channels: Optional[Sequence[int]] = None  # explicit per level; else model_channels * channel_mult
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: Union[int, Sequence[int]] = 2
    attention_resolutions: Sequence[int] = (32, 16, 8)
    mid_attention: bool = True
    head_dim: int = 64
    num_heads: int = 0  # > 0 fixes the head count instead of head_dim
    num_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift_norm: bool = True  # AdaGN; False: the embedding is added before norm2
    resblock_updown: bool = True  # BigGAN resblock up/down; False: strided conv / nearest + conv
    dropout: float = 0.0
    time_embed_dim: int = 0  # 0: 4 * channels[0]
    # decoder conditioning
    use_image_embed: bool = False
    num_context_tokens: int = 4
    use_text_encodings: bool = False
    use_text_embed: bool = False  # Karlo: pooled text embedding added to the time embedding
    context_dim: int = 512
    # 0: a dropped caption is one learned context token. > 0: it is the parameter
    # `null_text_encodings` (text_len, text_width), an encoding like the inputs' (Karlo: CLIP's
    # encoding of the empty caption), projected as they are, its first `null_text_tokens`
    # positions unmasked (CLIP's empty caption: the start and end tokens, 2)
    null_text_tokens: int = 0
    # > 0: the image embedding enters as (image_embed - image_embed_mean) / image_embed_std, the
    # training set's statistics: unit-norm CLIP embeddings share a large common direction and
    # vary by ~0.07 per dimension, which the conditioning layers would otherwise learn slowly
    image_embed_mean: Sequence[float] = ()
    image_embed_std: float = 0.0
    # upsampler conditioning
    use_low_res: bool = False
    low_res_resize: str = "bicubic"
    use_noise_level: bool = False
    dtype: Any = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"  # "none" | "block"
    # models.attention: "blocked" recomputes each group of heads' softmax in the backward pass
    # instead of storing the logits (2.2x faster at 32px on CPU); "auto": blocked on CPU, else dense
    attention_impl: str = "auto"
    # how a 3x3 convolution of a 2x nearest-upsampled map is computed (up blocks' conv1, Upsample):
    # "phases" at the low resolution, 4/9 of the multiply-adds; "direct" upsamples first
    upsample_conv: str = "phases"

    @property
    def level_channels(self) -> tuple[int, ...]:
        if self.channels:
            return tuple(int(c) for c in self.channels)
        return tuple(int(self.model_channels * m) for m in self.channel_mult)

    @property
    def level_blocks(self) -> tuple[int, ...]:
        levels = len(self.level_channels)
        if isinstance(self.num_res_blocks, int):
            return (self.num_res_blocks,) * levels
        blocks = tuple(int(n) for n in self.num_res_blocks)
        if len(blocks) != levels:
            raise ValueError(f"num_res_blocks: expected an int or {levels} values (one per level), got {blocks}")
        return blocks

    @property
    def level_attention(self) -> tuple[bool, ...]:
        resolutions = {int(r) for r in self.attention_resolutions}
        return tuple(self.image_size // 2**i in resolutions for i in range(len(self.level_channels)))

    def _check_config(self) -> None:
        chans = self.level_channels
        if not chans:
            raise ValueError("channels/channel_mult: expected at least one level")
        for c in chans:
            if c % self.num_groups:
                raise ValueError(f"num_groups: every level's channel count must be divisible by "
                                 f"num_groups={self.num_groups}, got channels {chans}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl: expected one of {IMPLEMENTATIONS}, got {self.attention_impl!r}")
        if self.upsample_conv not in UPSAMPLE_CONV_IMPLS:
            raise ValueError(f"upsample_conv: expected one of {UPSAMPLE_CONV_IMPLS}, got {self.upsample_conv!r}")
        if self.remat not in ("none", "block"):
            raise ValueError(f"remat: expected 'none' or 'block', got {self.remat!r}")
        if self.use_low_res and self.low_res_resize not in _RESIZE_METHODS:
            raise ValueError(f"low_res_resize: expected one of {_RESIZE_METHODS}, got {self.low_res_resize!r}")
        if isinstance(self.null_text_tokens, bool) or not isinstance(self.null_text_tokens, int) \
                or self.null_text_tokens < 0:
            raise ValueError(f"null_text_tokens: expected an int >= 0, got {self.null_text_tokens!r}")
        if (self.use_text_encodings or self.use_image_embed) and self.context_dim <= 0:
            raise ValueError(f"context_dim: expected a positive width, got {self.context_dim}")

    @nn.compact
    def __call__(self, x: Array, t: Array, *, image_embed: Optional[Array] = None,
                 text_encodings: Optional[Array] = None, text_mask: Optional[Array] = None,
                 text_embed: Optional[Array] = None, drop_image: Optional[Array] = None,
                 drop_text: Optional[Array] = None, low_res: Optional[Array] = None,
                 noise_level: Optional[Array] = None, train: bool = False) -> Array:
        """x: (B, H, W, C) noisy images; t: (B,) int training timesteps.

        image_embed (B, D), text_encodings (B, L, W) with text_mask (B, L)
        (1 = real token) and text_embed (B, D) condition the decoder; drop_image
        / drop_text (bool (B,) or scalar) swap in the learned null values.
        low_res (B, h, w, C) and noise_level (B,) condition the upsampler.
        """
        self._check_config()
        dtype = compute_dtype(self.dtype)
        chans, blocks, attention = self.level_channels, self.level_blocks, self.level_attention
        levels = len(chans)
        if x.ndim != 4:
            raise ValueError(f"x: expected (batch, height, width, channels), got shape {x.shape}")
        batch, height, width, _ = x.shape
        factor = 2 ** (levels - 1)
        if height % factor or width % factor:
            raise ValueError(f"x: height and width must be divisible by {factor} for {levels} levels, "
                             f"got {height}x{width}")
        t = jnp.asarray(t)
        if t.shape != (batch,):
            raise ValueError(f"t: expected shape ({batch},), got {t.shape}")

        emb_dim = self.time_embed_dim or 4 * chans[0]
        emb = TimeEmbedding(emb_dim, dtype, name="time_embedding")(timestep_embedding(t, chans[0]))
        if self.use_noise_level:
            if noise_level is None:
                raise ValueError("noise_level: required (B,) array when use_noise_level=True")
            level = jnp.broadcast_to(jnp.asarray(noise_level), (batch,))
            emb = emb + TimeEmbedding(emb_dim, dtype, name="noise_level_embedding")(
                timestep_embedding(level, chans[0]))
        emb, context, context_mask = self._conditioning(
            emb, batch, image_embed, text_encodings, text_mask, text_embed, drop_image, drop_text, dtype)
        emb = nn.silu(emb)

        h = x
        if self.use_low_res:
            h = jnp.concatenate([x, self._resize_low_res(low_res, x.shape)], axis=-1)

        res_block = _RematResBlock if self.remat == "block" else ResBlock
        attn_block = _RematAttentionBlock if self.remat == "block" else AttentionBlock
        res = lambda ch, name, resample="none": res_block(
            ch, self.num_groups, self.norm_eps, self.scale_shift_norm, self.dropout, resample,
            not train, dtype, self.upsample_conv, name=name)
        attn = lambda name: attn_block(self.head_dim, self.num_heads, self.num_groups, self.norm_eps,
                                       dtype, self.attention_impl, name=name)

        h = Conv(chans[0], (3, 3), dtype, name="conv_in")(h.astype(dtype))
        skips = [h]
        for level in range(levels):
            for i in range(blocks[level]):
                h = res(chans[level], f"down_blocks_{level}_resnets_{i}")(h, emb)
                if attention[level]:
                    h = attn(f"down_blocks_{level}_attentions_{i}")(h, context, context_mask)
                skips.append(h)
            if level != levels - 1:
                name = f"down_blocks_{level}_downsamplers_0"
                if self.resblock_updown:
                    h = res(chans[level], name, "down")(h, emb)
                else:
                    h = Downsample(dtype, name=name)(h, emb)
                skips.append(h)

        h = res(chans[-1], "mid_block_resnets_0")(h, emb)
        if self.mid_attention:
            h = attn("mid_block_attentions_0")(h, context, context_mask)
        h = res(chans[-1], "mid_block_resnets_1")(h, emb)

        for up, level in enumerate(reversed(range(levels))):
            for i in range(blocks[level] + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(chans[level], f"up_blocks_{up}_resnets_{i}")(h, emb)
                if attention[level]:
                    h = attn(f"up_blocks_{up}_attentions_{i}")(h, context, context_mask)
            if level != 0:
                name = f"up_blocks_{up}_upsamplers_0"
                if self.resblock_updown:
                    h = res(chans[level], name, "up")(h, emb)
                else:
                    h = Upsample(dtype, self.upsample_conv, name=name)(h, emb)

        h = nn.silu(GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=dtype, name="conv_norm_out")(h))
        out_channels = self.out_channels * (2 if self.learned_variance else 1)
        out = Conv(out_channels, (3, 3), dtype, nn.initializers.zeros, name="conv_out")(h)
        return out.astype(jnp.float32)

    def _resize_low_res(self, low_res: Optional[Array], shape: tuple[int, ...]) -> Array:
        if low_res is None:
            raise ValueError("low_res: required (B, h, w, C) array when use_low_res=True")
        if low_res.ndim != 4 or low_res.shape[0] != shape[0]:
            raise ValueError(f"low_res: expected ({shape[0]}, h, w, C), got shape {low_res.shape}")
        target = (shape[0], shape[1], shape[2], low_res.shape[-1])
        if low_res.shape == target:
            return low_res.astype(jnp.float32)
        return jax.image.resize(low_res.astype(jnp.float32), target, self.low_res_resize)

    def _conditioning(self, emb, batch, image_embed, text_encodings, text_mask, text_embed,
                      drop_image, drop_text, dtype):
        """Adds the CLIP embeddings to `emb`; returns (emb, context, context_mask)."""
        dense = lambda features, name: nn.Dense(features, dtype=dtype, name=name)
        tokens, masks = [], []
        if self.use_image_embed:
            if image_embed is None or image_embed.ndim != 2 or image_embed.shape[0] != batch:
                shape = None if image_embed is None else image_embed.shape
                raise ValueError(f"image_embed: expected shape ({batch}, D) when use_image_embed=True, got {shape}")
            image_embed = image_embed.astype(jnp.float32)
            if self.image_embed_std:
                mean = jnp.asarray(self.image_embed_mean, jnp.float32)
                if mean.shape != image_embed.shape[-1:]:
                    raise ValueError(f"image_embed_mean: expected {image_embed.shape[-1]} values (the embedding "
                                     f"width), got {mean.shape[0] if mean.ndim == 1 else mean.shape}")
                image_embed = (image_embed - mean) / self.image_embed_std
            null = self.param("null_image_embed", nn.initializers.zeros, (image_embed.shape[-1],))
            drop = _drop_flags(drop_image, batch, "drop_image")
            image_embed = jnp.where(drop[:, None], null[None], image_embed)
            emb = emb + dense(emb.shape[-1], "image_embed_to_time")(image_embed)
            if self.num_context_tokens:
                extra = dense(self.num_context_tokens * self.context_dim, "image_embed_to_tokens")(image_embed)
                tokens.append(extra.reshape(batch, self.num_context_tokens, self.context_dim))
                masks.append(jnp.ones((batch, self.num_context_tokens), bool))
        if self.use_text_embed:
            if text_embed is None or text_embed.ndim != 2 or text_embed.shape[0] != batch:
                shape = None if text_embed is None else text_embed.shape
                raise ValueError(f"text_embed: expected shape ({batch}, D) when use_text_embed=True, got {shape}")
            null = self.param("null_text_embed", nn.initializers.zeros, (text_embed.shape[-1],))
            drop = _drop_flags(drop_text, batch, "drop_text")
            text_embed = jnp.where(drop[:, None], null[None], text_embed.astype(jnp.float32))
            emb = emb + dense(emb.shape[-1], "text_embed_to_time")(text_embed)
        if self.use_text_encodings:
            if text_encodings is None or text_encodings.ndim != 3 or text_encodings.shape[0] != batch:
                shape = None if text_encodings is None else text_encodings.shape
                raise ValueError(f"text_encodings: expected shape ({batch}, L, W) when use_text_encodings=True, "
                                 f"got {shape}")
            length = text_encodings.shape[1]
            if text_mask is None:
                mask = jnp.ones((batch, length), bool)
            else:
                mask = jnp.asarray(text_mask)
                if mask.shape != (batch, length):
                    raise ValueError(f"text_mask: expected shape ({batch}, {length}), got {mask.shape}")
                mask = mask.astype(bool)
            drop = _drop_flags(drop_text, batch, "drop_text")
            if self.null_text_tokens:
                null = self._null_text_encodings(text_encodings.shape[1:])
                text_encodings = jnp.where(drop[:, None, None], null[None], text_encodings)
                mask = jnp.where(drop[:, None], (jnp.arange(length) < self.null_text_tokens)[None], mask)
            text = dense(self.context_dim, "text_encodings_proj")(text_encodings)
            text = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="text_encodings_norm")(text)
            if not self.null_text_tokens:
                # A dropped caption becomes one learned null token; the other positions are masked.
                null = self.param("null_text_encoding", nn.initializers.normal(0.02), (self.context_dim,))
                text = jnp.where(drop[:, None, None], null.astype(text.dtype)[None, None], text)
                mask = jnp.where(drop[:, None], (jnp.arange(length) == 0)[None], mask)
            tokens.append(text)
            masks.append(mask)
        if not tokens:
            return emb, None, None
        context = jnp.concatenate([tok.astype(dtype) for tok in tokens], axis=1)
        return emb, context, jnp.concatenate(masks, axis=1)

    def _null_text_encodings(self, shape: tuple[int, int]) -> Array:
        """The stored null caption encoding (`null_text_tokens` > 0); `shape` = the inputs' (L, W)."""
        name = "null_text_encodings"
        if self.has_variable("params", name):
            stored = tuple(self.get_variable("params", name).shape)
            if stored != tuple(shape):
                raise ValueError(f"text_encodings: expected (batch, {stored[0]}, {stored[1]}), the shape of the "
                                 f"stored null caption encoding, got (batch, {shape[0]}, {shape[1]})")
        if self.null_text_tokens > shape[0]:
            raise ValueError(f"null_text_tokens: expected at most the text length {shape[0]}, "
                             f"got {self.null_text_tokens}")
        return self.param(name, nn.initializers.normal(0.02), tuple(shape)).astype(jnp.float32)
