"""load_hf_clip: parity with transformers' PyTorch CLIPModel on small random models."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the reference; installed by the dev extra
import transformers
from flax import traverse_util

from dalle2_jax.convert.hf_clip import load_hf_clip
from dalle2_jax.models.clip import CLIP

pytestmark = pytest.mark.parity_transformers

VOCAB, EOS, CONTEXT, IMAGE = 1000, 999, 16, 32


def _save_random_clip(directory, hidden_act, safe_serialization=True, seed=0):
    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CONTEXT, hidden_act=hidden_act,
                eos_token_id=EOS, bos_token_id=998, pad_token_id=0, projection_dim=48)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE, patch_size=8, hidden_act=hidden_act, projection_dim=48)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=48)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial layer norms, biases and scale, so a mapping slip shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
        model.logit_scale.fill_(2.0)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    return model


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [CONTEXT, 9, 5, 2]
    input_ids = np.zeros((len(lengths), CONTEXT), np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = np.concatenate([[998], rng.integers(1, 998, n - 2), [EOS]])
        attention_mask[row, :n] = 1
    input_ids[1, 9:] = EOS  # padding with the eos token itself: pooling must take the first one
    pixels = rng.standard_normal((3, 3, IMAGE, IMAGE)).astype(np.float32)  # NCHW, as transformers wants
    return input_ids, attention_mask, pixels


def _hf_outputs(model, input_ids, attention_mask, pixels):
    ids, mask, px = torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(pixels)
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids, attention_mask=mask)
        image = model.get_image_features(pixel_values=px)
        both = model(input_ids=ids, attention_mask=mask, pixel_values=px)
    as_np = lambda t: t.detach().numpy()  # noqa: E731
    # transformers 5 returns model outputs here: projected pooled features in pooler_output.
    return dict(
        text_embeds=as_np(getattr(text, "pooler_output", text)),
        text_hidden=as_np(both.text_model_output.last_hidden_state),
        image_embeds=as_np(getattr(image, "pooler_output", image)),
        logits_per_image=as_np(both.logits_per_image),
    )


def _our_outputs(model, params, input_ids, attention_mask, pixels):
    out = jax.jit(model.apply)(
        params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(pixels.transpose(0, 2, 3, 1)),
        jnp.asarray(attention_mask, jnp.int32),
    )
    return dict(
        text_embeds=np.asarray(out.text.embeds),
        text_hidden=np.asarray(out.text.encodings),
        image_embeds=np.asarray(out.image.embeds),
        logits_per_image=np.asarray(out.logits_per_image),
    )


@pytest.fixture(scope="module")
def quick_gelu_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_quick_gelu")
    return directory, _save_random_clip(directory, "quick_gelu")


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_parity_with_transformers(hidden_act, quick_gelu_dir, tmp_path):
    if hidden_act == "quick_gelu":
        directory, reference = quick_gelu_dir
    else:
        directory, reference = tmp_path, _save_random_clip(tmp_path, hidden_act, seed=1)
    model, params = load_hf_clip(directory)
    assert isinstance(model, CLIP)
    assert (model.activation, model.text_pooling, model.eos_token_id) == (hidden_act, "eos", EOS)
    assert (model.embed_dim, model.context_length, model.image_size, model.patch_size) == (48, CONTEXT, IMAGE, 8)
    inputs = _inputs()
    expected = _hf_outputs(reference, *inputs)
    ours = _our_outputs(model, params, *inputs)
    for name, value in expected.items():
        assert ours[name].shape == value.shape, name
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=1e-5, err_msg=name)
    # The check is not vacuous: the features differ between rows and are O(1).
    assert np.abs(expected["text_embeds"][0] - expected["text_embeds"][1]).max() > 0.1
    assert np.abs(expected["logits_per_image"]).max() > 0.1


def _assert_same_params(a, b, dtype=np.float32):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_b[key].dtype == dtype, key
        np.testing.assert_array_equal(np.asarray(flat_a[key], dtype), flat_b[key], err_msg=str(key))


def test_other_checkpoint_formats_load_the_same_params(quick_gelu_dir, tmp_path):
    directory, reference = quick_gelu_dir
    _, expected = load_hf_clip(directory)
    # transformers 5 only writes safetensors; a legacy checkpoint is config.json + a torch.save'd state dict.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(directory / "config.json", legacy / "config.json")
    torch.save(reference.state_dict(), legacy / "pytorch_model.bin")
    _assert_same_params(expected, load_hf_clip(legacy)[1])
    # Sharded safetensors with an index.
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    _assert_same_params(expected, load_hf_clip(sharded)[1])
    # bfloat16 safetensors (no numpy dtype for it) loaded as bfloat16 params and compute.
    from safetensors.torch import save_file

    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    shutil.copy(directory / "config.json", bf16 / "config.json")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in reference.state_dict().items()},
              bf16 / "model.safetensors")
    model, params = load_hf_clip(bf16, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    _assert_same_params(expected, params, dtype=jnp.bfloat16)


def _rewrite_safetensors(source, target, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copy(source / "config.json", target / "config.json")
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors")


def test_missing_key_is_named(quick_gelu_dir, tmp_path):
    directory, _ = quick_gelu_dir
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    _rewrite_safetensors(directory, tmp_path, lambda state: state.pop(key))
    with pytest.raises(ValueError, match=rf"missing keys.*{key}"):
        load_hf_clip(tmp_path)


def test_wrong_shape_is_named(quick_gelu_dir, tmp_path):
    directory, _ = quick_gelu_dir
    key = "text_model.embeddings.position_embedding.weight"

    def edit(state):
        state[key] = state[key][:-1]

    _rewrite_safetensors(directory, tmp_path, edit)
    with pytest.raises(ValueError, match=rf"shape mismatches.*{key}: checkpoint \(15, 64\), expected \(16, 64\)"):
        load_hf_clip(tmp_path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_clip(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_clip(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_clip(tmp_path)
