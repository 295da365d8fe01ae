"""UNet: building blocks against NumPy references, decoder conditioning, upsampler, training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle2_jax.models import unet as unet_lib
from dalle2_jax.models.unet import AttentionBlock, ResBlock, UNet

import numpy_reference

B, SIZE, EMBED, TEXT_LEN, TEXT_WIDTH = 4, 16, 12, 6, 10

DECODER = dict(image_size=SIZE, channels=(16, 32), num_res_blocks=1, attention_resolutions=(8,), head_dim=8,
               num_groups=4, use_image_embed=True, num_context_tokens=2, use_text_encodings=True, context_dim=16)


def _perturb(params, key, scale=0.2):
    """Random values in every parameter: zero-initialised output convs would hide the inputs."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _np_conv3x3(x, kernel, bias):
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(xp[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(3) for j in range(3))
    return out + bias


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def decoder():
    model = UNet(**DECODER)
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (B, SIZE, SIZE, 3))
    t = jnp.array([0, 250, 500, 999])
    lengths = jnp.array([6, 3, 1, 4])
    cond = dict(image_embed=jax.random.normal(keys[1], (B, EMBED)),
                text_encodings=jax.random.normal(keys[2], (B, TEXT_LEN, TEXT_WIDTH)),
                text_mask=jnp.arange(TEXT_LEN)[None] < lengths[:, None],
                drop_image=jnp.zeros((B,), bool), drop_text=jnp.zeros((B,), bool))
    params = _perturb(model.init(keys[3], x, t, **cond), keys[4])
    apply = jax.jit(model.apply)
    return model, params, apply, x, t, cond


def test_timestep_embedding_matches_formula():
    t = jnp.array([0, 7, 999])
    emb = np.asarray(unet_lib.timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(np.outer([0, 7, 999], freqs)), np.sin(np.outer([0, 7, 999], freqs))], 1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parity_numpy
@pytest.mark.parametrize("scale_shift_norm", [True, False])
def test_resblock_matches_numpy_reference(scale_shift_norm):
    key = jax.random.key(1)
    x = jax.random.normal(key, (2, 4, 4, 4))
    emb = jax.random.normal(jax.random.key(2), (2, 6))
    block = ResBlock(8, num_groups=2, scale_shift_norm=scale_shift_norm)
    params = _perturb(block.init(key, x, emb), jax.random.key(3))
    out = np.asarray(block.apply(params, x, emb))

    p = jax.tree.map(np.asarray, params["params"])
    xn, en = np.asarray(x), np.asarray(emb)
    h = _silu(numpy_reference.group_norm(xn, 2, p["norm1"]["scale"], p["norm1"]["bias"]))
    h = _np_conv3x3(h, p["conv1"]["kernel"], p["conv1"]["bias"])
    # The UNet applies SiLU to the time embedding once; blocks receive it activated.
    e = (en @ p["time_emb_proj"]["kernel"] + p["time_emb_proj"]["bias"])[:, None, None, :]
    if scale_shift_norm:
        scale, shift = e[..., :8], e[..., 8:]
        h = numpy_reference.group_norm(h, 2, p["norm2"]["scale"], p["norm2"]["bias"]) * (1 + scale) + shift
    else:
        h = numpy_reference.group_norm(h + e, 2, p["norm2"]["scale"], p["norm2"]["bias"])
    h = _np_conv3x3(_silu(h), p["conv2"]["kernel"], p["conv2"]["bias"])
    skip = xn @ p["conv_shortcut"]["kernel"][0, 0] + p["conv_shortcut"]["bias"]
    np.testing.assert_allclose(out, skip + h, rtol=1e-4, atol=1e-4)


def test_resblock_down_and_up_resample():
    x = jax.random.normal(jax.random.key(4), (1, 8, 8, 4))
    emb = jnp.zeros((1, 4))
    for resample, size in (("down", 4), ("up", 16)):
        block = ResBlock(4, num_groups=2, resample=resample)
        params = block.init(jax.random.key(0), x, emb)
        out = block.apply(params, x, emb)  # zero-initialised conv2: the output is the resampled skip
        expected = unet_lib.avg_pool_2x(x) if resample == "down" else unet_lib.upsample_nearest_2x(x)
        assert out.shape == (1, size, size, 4)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(unet_lib.avg_pool_2x(unet_lib.upsample_nearest_2x(x)), x, rtol=1e-6)


@pytest.mark.parity_numpy
def test_convolution_resampling_matches_numpy_reference():
    """resblock_updown=False: a stride-2 convolution down, nearest 2x then a convolution up."""
    x = jax.random.normal(jax.random.key(5), (1, 6, 6, 3))
    emb = jnp.zeros((1, 4))
    x_np = np.asarray(x, np.float64)
    for block, source, stride, size in ((unet_lib.Downsample(), x_np, 2, 3),
                                        (unet_lib.Upsample(), x_np.repeat(2, 1).repeat(2, 2), 1, 12)):
        params = _perturb(block.init(jax.random.key(1), x, emb), jax.random.key(2), scale=1.0)
        conv = params["params"]["conv"]
        out = np.asarray(block.apply(params, x, emb))
        # A stride-2 convolution with padding 1 is the same-size one read at every other pixel.
        expected = _np_conv3x3(source, np.asarray(conv["kernel"], np.float64),
                               np.asarray(conv["bias"], np.float64))[:, ::stride, ::stride]
        assert out.shape == (1, size, size, 3)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    model = UNet(**dict(DECODER, resblock_updown=False))
    x, t = jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1,), jnp.int32)
    cond = dict(image_embed=jnp.zeros((1, EMBED)), text_encodings=jnp.zeros((1, TEXT_LEN, TEXT_WIDTH)))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **cond))["params"]
    assert set(params["down_blocks_0_downsamplers_0"]) == {"conv"}
    assert set(params["up_blocks_0_upsamplers_0"]) == {"conv"}


@pytest.mark.parity_numpy
def test_phase_split_upsampling_convolution_matches_upsample_then_convolve():
    """conv_upsampled_3x3 is the 3x3 convolution of the nearest-upsampled map, values and gradients."""
    x = jax.random.normal(jax.random.key(6), (2, 5, 7, 3))
    kernel = jax.random.normal(jax.random.key(7), (3, 3, 3, 4))
    x_np, kernel_np = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    expected = _np_conv3x3(x_np.repeat(2, 1).repeat(2, 2), kernel_np, 0.0)
    out = unet_lib.conv_upsampled_3x3(x, kernel)
    assert out.shape == (2, 10, 14, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    cotangent = jax.random.normal(jax.random.key(8), out.shape)
    direct = lambda x, kernel: unet_lib._conv_same(unet_lib.upsample_nearest_2x(x), kernel)
    vjp = lambda f: jax.vjp(f, x, kernel)[1](cotangent)
    for grad, grad_direct in zip(vjp(unet_lib.conv_upsampled_3x3), vjp(direct)):
        np.testing.assert_allclose(grad, grad_direct, rtol=1e-5, atol=1e-4)

    # A 1x1 kernel convolves, then upsamples; "direct" is the reference formulation.
    for size in ((3, 3), (1, 1)):
        conv = lambda impl: unet_lib.Conv(4, size, upsample=impl)
        params = _perturb(conv("phases").init(jax.random.key(9), x), jax.random.key(10))
        np.testing.assert_allclose(conv("phases").apply(params, x), conv("direct").apply(params, x),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_size"):
        unet_lib.Conv(4, (5, 5), upsample="phases").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="upsample"):
        unet_lib.Conv(4, upsample="bilinear").init(jax.random.key(0), x)


def test_up_block_and_unet_same_with_either_upsampling_convolution(decoder):
    """upsample_conv="phases" (the default) and "direct" agree in outputs and parameter gradients."""
    x = jax.random.normal(jax.random.key(11), (2, 4, 6, 8))
    emb = jax.random.normal(jax.random.key(12), (2, 16))
    block = lambda impl: ResBlock(8, num_groups=2, resample="up", upsample_conv=impl)
    params = _perturb(block("phases").init(jax.random.key(13), x, emb), jax.random.key(14))
    np.testing.assert_allclose(block("phases").apply(params, x, emb), block("direct").apply(params, x, emb),
                               rtol=1e-5, atol=1e-5)

    model, params, _, x, t, cond = decoder
    loss = lambda params, model: jnp.sum(model.apply(params, x, t, **cond) ** 2)
    value, grads = jax.value_and_grad(loss)(params, model)
    direct_value, direct_grads = jax.value_and_grad(loss)(params, model.clone(upsample_conv="direct"))
    np.testing.assert_allclose(value, direct_value, rtol=1e-5)
    # Float rounding, relative to each gradient's largest entry (sums of squares reach 1e2 here).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b)))),
                 grads, direct_grads)
    with pytest.raises(ValueError, match="upsample_conv"):
        model.clone(upsample_conv="subpixel").apply(params, x, t, **cond)


@pytest.mark.parity_numpy
def test_attention_matches_numpy_reference_with_context_and_mask():
    heads, width = 2, 8
    x = jax.random.normal(jax.random.key(5), (2, 2, 3, width))
    context = jax.random.normal(jax.random.key(6), (2, 3, 5))
    mask = jnp.array([[True, True, False], [True, False, False]])
    block = AttentionBlock(head_dim=width // heads, num_groups=2)
    params = _perturb(block.init(jax.random.key(7), x, context, mask), jax.random.key(8))
    out = np.asarray(block.apply(params, x, context, mask))

    p = jax.tree.map(np.asarray, params["params"])
    lin = lambda a, name: a @ p[name]["kernel"] + p[name]["bias"]
    h = numpy_reference.group_norm(np.asarray(x), 2, p["group_norm"]["scale"], p["group_norm"]["bias"]).reshape(2, 6, width)
    c = np.asarray(context)
    q = lin(h, "to_q")
    k = np.concatenate([lin(c, "add_k_proj"), lin(h, "to_k")], 1)  # context keys first (GLIDE, diffusers)
    v = np.concatenate([lin(c, "add_v_proj"), lin(h, "to_v")], 1)
    full_mask = np.concatenate([np.asarray(mask), np.ones((2, 6), bool)], 1)
    out_ref = np.zeros_like(q)
    for b in range(2):
        for head in range(heads):
            sl = slice(head * 4, head * 4 + 4)
            logits = q[b, :, sl] @ k[b, :, sl].T / 2.0
            logits = np.where(full_mask[b][None], logits, -np.inf)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out_ref[b, :, sl] = (w / w.sum(-1, keepdims=True)) @ v[b, :, sl]
    expected = np.asarray(x) + lin(out_ref, "to_out").reshape(x.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_parameter_names_mirror_diffusers_blocks():
    model = UNet(**dict(DECODER, channels=(16, 32, 32), num_res_blocks=2, attention_resolutions=(8, 4)))
    x, t = jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1,), jnp.int32)
    cond = dict(image_embed=jnp.zeros((1, EMBED)), text_encodings=jnp.zeros((1, TEXT_LEN, TEXT_WIDTH)))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **cond))["params"]
    down = {n for n in params if n.startswith("down_blocks")}
    assert down == {"down_blocks_0_resnets_0", "down_blocks_0_resnets_1", "down_blocks_0_downsamplers_0",
                    "down_blocks_1_resnets_0", "down_blocks_1_resnets_1", "down_blocks_1_attentions_0",
                    "down_blocks_1_attentions_1", "down_blocks_1_downsamplers_0",
                    "down_blocks_2_resnets_0", "down_blocks_2_resnets_1", "down_blocks_2_attentions_0",
                    "down_blocks_2_attentions_1"}
    up = {n for n in params if n.startswith("up_blocks")}
    assert up == ({f"up_blocks_{u}_resnets_{i}" for u in range(3) for i in range(3)}
                  | {f"up_blocks_{u}_attentions_{i}" for u in range(2) for i in range(3)}
                  | {"up_blocks_0_upsamplers_0", "up_blocks_1_upsamplers_0"})
    assert {"mid_block_resnets_0", "mid_block_attentions_0", "mid_block_resnets_1", "conv_in", "conv_norm_out",
            "conv_out", "time_embedding", "null_image_embed", "image_embed_to_time", "image_embed_to_tokens",
            "text_encodings_proj", "text_encodings_norm", "null_text_encoding"} <= set(params)
    # Up-block resnets take [h; skip]: ADM/diffusers channel bookkeeping.
    assert params["up_blocks_0_resnets_0"]["conv1"]["kernel"].shape == (3, 3, 64, 32)
    assert params["up_blocks_1_resnets_2"]["conv1"]["kernel"].shape == (3, 3, 48, 32)
    assert params["up_blocks_2_resnets_2"]["conv1"]["kernel"].shape == (3, 3, 32, 16)
    assert params["down_blocks_1_attentions_0"]["add_k_proj"]["kernel"].shape == (16, 32)
    assert params["image_embed_to_tokens"]["kernel"].shape == (EMBED, 2 * 16)
    assert params["conv_out"]["kernel"].shape == (3, 3, 16, 3)


def test_zero_initialised_output(decoder):
    model, _, _, x, t, cond = decoder
    params = model.init(jax.random.key(9), x, t, **cond)
    out = model.apply(params, x, t, **cond)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) == 0.0


def test_dropping_conditioning_changes_output_and_selects_null_values(decoder):
    _, params, apply, x, t, cond = decoder
    base = apply(params, x, t, **cond)
    assert base.shape == x.shape and bool(jnp.all(jnp.isfinite(base)))
    per_example = lambda a, b: np.asarray(jnp.max(jnp.abs(a - b), axis=(1, 2, 3)))

    drop = jnp.array([True, False, True, False])
    dropped_image = apply(params, x, t, **dict(cond, drop_image=drop))
    dropped_text = apply(params, x, t, **dict(cond, drop_text=drop))
    for out in (dropped_image, dropped_text):
        diff = per_example(out, base)
        assert np.all(diff[[0, 2]] > 1e-3) and np.all(diff[[1, 3]] < 1e-6)

    # With the flag set the passed embedding is ignored: the learned null replaces it.
    other = dict(cond, image_embed=cond["image_embed"] + 3.0, drop_image=drop)
    np.testing.assert_array_equal(per_example(apply(params, x, t, **other), dropped_image)[[0, 2]], 0.0)
    null = params["params"]["null_image_embed"]
    as_null = dict(cond, image_embed=jnp.broadcast_to(null, cond["image_embed"].shape))
    np.testing.assert_allclose(np.asarray(apply(params, x, t, **as_null))[[0, 2]], np.asarray(dropped_image)[[0, 2]],
                               atol=1e-5)

    # A dropped caption ignores both the encodings and the mask, and uses the learned null token.
    other = dict(cond, text_encodings=-cond["text_encodings"], text_mask=jnp.ones_like(cond["text_mask"]),
                 drop_text=drop)
    np.testing.assert_array_equal(per_example(apply(params, x, t, **other), dropped_text)[[0, 2]], 0.0)
    new_null = jax.tree.map(lambda a: a, params)
    new_null["params"]["null_text_encoding"] = params["params"]["null_text_encoding"] + 1.0
    diff = per_example(apply(new_null, x, t, **dict(cond, drop_text=drop)), dropped_text)
    assert np.all(diff[[0, 2]] > 1e-3) and np.all(diff[[1, 3]] < 1e-6)

    # Scalar flags broadcast over the batch.
    np.testing.assert_array_equal(apply(params, x, t, **dict(cond, drop_image=True)),
                                  apply(params, x, t, **dict(cond, drop_image=jnp.ones((B,), bool))))


def test_standardised_image_embed_is_the_plain_model_on_standardised_inputs(decoder):
    """image_embed_mean/std: the same parameters on (e - mean) / std, the null in standardised units."""
    _, params, apply, x, t, cond = decoder
    mean = jnp.linspace(-0.5, 0.5, EMBED)
    std = 0.07
    model = UNet(**dict(DECODER, image_embed_mean=tuple(float(m) for m in mean), image_embed_std=std))
    standardised = dict(cond, image_embed=(cond["image_embed"] - mean) / std)
    np.testing.assert_allclose(model.apply(params, x, t, **cond), apply(params, x, t, **standardised),
                               rtol=1e-5, atol=1e-5)
    drop = jnp.array([True, False, True, False])
    np.testing.assert_allclose(model.apply(params, x, t, **dict(cond, drop_image=drop)),
                               apply(params, x, t, **dict(standardised, drop_image=drop)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="image_embed_mean"):
        UNet(**dict(DECODER, image_embed_mean=(0.0, 1.0), image_embed_std=std)).apply(params, x, t, **cond)


def test_padded_text_tokens_are_masked(decoder):
    _, params, apply, x, t, cond = decoder
    base = apply(params, x, t, **cond)
    mask = cond["text_mask"]
    changed = jnp.where(mask[..., None], cond["text_encodings"], 5.0 * cond["text_encodings"] + 1.0)
    np.testing.assert_array_equal(apply(params, x, t, **dict(cond, text_encodings=changed)), base)
    real_changed = cond["text_encodings"].at[:, 0].add(1.0)  # position 0 is real in every example
    diff = jnp.max(jnp.abs(apply(params, x, t, **dict(cond, text_encodings=real_changed)) - base), axis=(1, 2, 3))
    assert bool(jnp.all(diff > 1e-3))


def test_bad_inputs_raise_value_errors(decoder):
    model, params, _, x, t, cond = decoder
    with pytest.raises(ValueError, match="image_embed"):
        model.apply(params, x, t, **dict(cond, image_embed=None))
    with pytest.raises(ValueError, match="text_mask"):
        model.apply(params, x, t, **dict(cond, text_mask=cond["text_mask"][:, :3]))
    with pytest.raises(ValueError, match="drop_text"):
        model.apply(params, x, t, **dict(cond, drop_text=jnp.zeros((B + 1,), bool)))
    with pytest.raises(ValueError, match="x:"):
        model.apply(params, x[:, :15], t, **cond)
    with pytest.raises(ValueError, match="t:"):
        model.apply(params, x, t[:2], **cond)
    with pytest.raises(ValueError, match="remat"):
        UNet(**dict(DECODER, remat="all")).init(jax.random.key(0), x, t, **cond)
    with pytest.raises(ValueError, match="num_groups"):
        UNet(**dict(DECODER, num_groups=5)).init(jax.random.key(0), x, t, **cond)


def test_remat_and_bfloat16_variants():
    """remat='block' changes memory, not numbers; bfloat16 compute keeps float32 params and output."""
    config = dict(image_size=8, channels=(8, 8), num_res_blocks=1, attention_resolutions=(4,), head_dim=4,
                  num_groups=2, use_image_embed=True, num_context_tokens=1, context_dim=4)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([3, 700])
    embed = jax.random.normal(jax.random.key(1), (2, 5))
    params = _perturb(UNet(**config).init(jax.random.key(2), x, t, image_embed=embed), jax.random.key(3))

    def loss(params, model):
        return jnp.sum(model.apply(params, x, t, image_embed=embed) ** 2)

    plain, remat = UNet(**config), UNet(**dict(config, remat="block"))
    grads = jax.grad(loss)(params, plain)
    remat_grads = jax.grad(loss)(params, remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, remat_grads)

    bf16 = UNet(**dict(config, dtype="bfloat16"))
    out = bf16.apply(params, x, t, image_embed=embed)
    ref = plain.apply(params, x, t, image_embed=embed)
    assert out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.init(jax.random.key(2), x, t, image_embed=embed)))
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_upsampler_runs_at_full_size_after_crop_training_shapes():
    model = UNet(image_size=16, channels=(8, 16), num_res_blocks=1, attention_resolutions=(), mid_attention=False,
                 num_groups=4, use_low_res=True, low_res_resize="bilinear", use_noise_level=True)
    crop = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    low_crop = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    t, level = jnp.array([10, 900]), jnp.array([0, 250])
    params = _perturb(model.init(jax.random.key(2), crop, t, low_res=low_crop, noise_level=level),
                      jax.random.key(3))
    assert params["params"]["conv_in"]["kernel"].shape == (3, 3, 6, 8)  # [x; upsampled low_res]
    assert not any("attentions" in name for name in params["params"])

    full = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    low = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
    out = model.apply(params, full, t, low_res=low, noise_level=level)
    assert out.shape == (2, 32, 32, 3) and bool(jnp.all(jnp.isfinite(out)))
    for changed in (dict(low_res=low + 0.5, noise_level=level), dict(low_res=low, noise_level=level + 100)):
        assert float(jnp.max(jnp.abs(model.apply(params, full, t, **changed) - out))) > 1e-3
    # A low_res already at the target size is used as is (callers may upsample it themselves).
    same = jax.image.resize(low, full.shape, "bilinear")
    np.testing.assert_allclose(model.apply(params, full, t, low_res=same, noise_level=level), out, atol=1e-5)
    with pytest.raises(ValueError, match="low_res"):
        model.apply(params, full, t, noise_level=level)


def test_tiny_decoder_overfits_one_batch(decoder):
    """eps-prediction MSE on a fixed (x0, noise, t) batch falls at least 10x."""
    model, _, _, _, _, cond = decoder
    keys = jax.random.split(jax.random.key(10), 3)
    yy, xx = jnp.mgrid[:SIZE, :SIZE] / SIZE
    x0 = jnp.stack([jnp.sin(6 * xx + i) * jnp.cos(4 * yy - i) for i in range(B)])[..., None] * jnp.ones(3)
    noise = jax.random.normal(keys[0], x0.shape)
    t = jnp.array([300, 500, 700, 900])
    alpha_bar = jnp.cos((t / 1000 + 0.008) / 1.008 * jnp.pi / 2) ** 2
    x_t = jnp.sqrt(alpha_bar)[:, None, None, None] * x0 + jnp.sqrt(1 - alpha_bar)[:, None, None, None] * noise
    params = model.init(keys[1], x_t, t, **cond)
    optimizer = optax.adam(2e-3)

    def loss_fn(params):
        return jnp.mean((model.apply(params, x_t, t, **cond) - noise) ** 2)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss
        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=150)
        return losses, loss_fn(params)

    losses, final = train(params)
    assert float(losses[0]) > 0.9  # zero-initialised output: the first loss is E[noise^2]
    assert float(final) < float(losses[0]) / 10, (float(losses[0]), float(final))


@pytest.mark.parametrize("config_name, stage, paper_params, tolerance", [
    ("configs/decoder.py:paper", "decoder", 3.5e9, 0.10),
    ("configs/upsampler.py:paper_256", "upsampler", 700e6, 0.10),
    ("configs/upsampler.py:paper_1024", "upsampler", 300e6, 0.10),
    ("configs/decoder.py:base", "decoder", 318e6, 0.02),  # "a few hundred million"
    ("configs/unet.py:bench", "decoder", 72.9e6, 0.01),
])
def test_config_parameter_counts_without_allocating(config_name, stage, paper_params, tolerance):
    """Ramesh et al. 2022, Table 3 (and the configs' own documented sizes), counted on the
    shapes `jax.eval_shape` gives: nothing is allocated."""
    from dalle2_jax import config_util
    from dalle2_jax.pipeline import abstract_variables, build_module

    config = config_util.load_config(config_name)
    module = build_module(stage, config)
    abstract = abstract_variables(stage, module, config)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    assert abs(count / paper_params - 1) <= tolerance, f"{config_name}: {count / 1e6:.1f}M parameters"
