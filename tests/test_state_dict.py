"""The weight-file reader the importers share: safetensors parsed here and read one tensor at a
time (same arrays as the safetensors library, nothing read until a key is looked up), sharded
checkpoints, damaged files named, and `to_device`'s on-device transposes and casts."""
import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from dalle2_jax.convert import state_dict


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal((5, 2)).astype(np.float16),
        "brain": rng.standard_normal((3, 7)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "flags": np.array([True, False, True]),
        "scale": np.asarray(4.6, np.float32),  # a 0-d tensor, as CLIP's logit_scale
        "empty": np.zeros((0, 4), np.float32),
    }


@pytest.fixture
def weight_file(tmp_path):
    file = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(_tensors(), str(file))
    return file


def test_reads_what_the_safetensors_library_reads(weight_file):
    state = state_dict.SafetensorsFile(weight_file)
    assert set(state) == set(_tensors()) and len(state) == len(_tensors())
    for key, want in _tensors().items():
        got = state[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got.astype(np.float64) if key == "brain" else got,
                                      want.astype(np.float64) if key == "brain" else want)


def test_reads_a_tensor_only_when_it_is_looked_up(weight_file, monkeypatch):
    reads = []
    original = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: reads.append(k.get("count")) or original(*a, **k))
    state = state_dict.SafetensorsFile(weight_file)
    assert "conv.weight" in state and "missing" not in state
    assert sorted(state) == sorted(_tensors()) and reads == []
    state["half"]
    assert reads == [10]


def test_sharded_checkpoint_reads_each_key_from_its_shard(tmp_path):
    tensors = _tensors()
    first = {k: tensors[k] for k in ("conv.weight", "half")}
    second = {k: v for k, v in tensors.items() if k not in first}
    safetensors.numpy.save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in first},
                  **{k: "model-00002-of-00002.safetensors" for k in second}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state, file = state_dict.read_weights(tmp_path, ("model.safetensors",), ("pytorch_model.bin",))
    assert file.endswith("model.safetensors.index.json") and set(state) == set(tensors)
    np.testing.assert_array_equal(state["ids"], tensors["ids"])
    np.testing.assert_array_equal(state["conv.weight"], tensors["conv.weight"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json names shards .*00002-of-00002"):
        state_dict.read_weights(tmp_path, ("model.safetensors",), ())


def _rewrite_header(file, edit):
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[:5]), "shorter than the 8-byte header length"),
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "a header of .* bytes in a file of 100"),
    (lambda f: f.write_bytes(struct.pack("<Q", 4) + b"[1] " + b"\0" * 8), "the header is not a JSON object"),
    (lambda f: f.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 8), "Expecting property name"),
    (lambda f: _rewrite_header(f, lambda h: h["half"].update(dtype="F128")), "tensor 'half' has a malformed header"),
    (lambda f: _rewrite_header(f, lambda h: h["half"].update(shape=[5, 3])), "tensor 'half' .* do not fit its size"),
    (lambda f: f.write_bytes(f.read_bytes()[:-8]), "do not fit its size or the file's"),
])
def test_a_damaged_file_is_named(weight_file, damage, message):
    damage(weight_file)
    with pytest.raises(ValueError, match=rf"path: .*model.safetensors is corrupt or not a safetensors file .*{message}"):
        state_dict.SafetensorsFile(weight_file)


def test_missing_weights_name_the_files_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no weights \(expected one of \('model.safetensors', "
                                                r"'pytorch_model.bin'\)\)"):
        state_dict.read_weights(tmp_path, ("model.safetensors",), ("pytorch_model.bin",))
    with pytest.raises(FileNotFoundError, match="no component directory"):
        state_dict.read_weights(tmp_path / "nowhere", ("model.safetensors",), ())


def test_torch_file_reads_bfloat16_as_float32_and_copies_out_of_the_mapping(tmp_path):
    import torch  # the dev extra installs it; the library reads safetensors without it

    values = {"w": torch.randn(3, 4).to(torch.bfloat16), "n": torch.arange(3)}
    torch.save(values, tmp_path / "pytorch_model.bin")
    state, _ = state_dict.read_weights(tmp_path, ("model.safetensors",), ("pytorch_model.bin",))
    assert "w" in state and set(state) == {"w", "n"}
    w = state["w"]
    assert w.dtype == np.float32 and w.flags.owndata
    np.testing.assert_array_equal(w, values["w"].float().numpy())
    np.testing.assert_array_equal(state["n"], [0, 1, 2])


def test_to_device_transposes_and_casts_on_the_device():
    value = np.random.default_rng(1).standard_normal((4, 3, 2, 5)).astype(np.float32)
    placed = state_dict.to_device(value, "bfloat16", axes=(2, 3, 1, 0))
    assert isinstance(placed, jax.Array) and placed.dtype == jax.numpy.bfloat16 and placed.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(np.asarray(placed), value.transpose(2, 3, 1, 0).astype(ml_dtypes.bfloat16))
    scalar = state_dict.to_device(np.asarray(2.5, np.float32))
    assert scalar.shape == () and float(scalar) == 2.5
    same = state_dict.to_device(placed)
    assert same is placed  # already there, in its dtype: nothing copied


def test_place_variables_puts_every_leaf_on_the_device_and_casts_only_floats():
    from dalle2_jax.pipeline.stages import place_variables

    host = {"params": {"kernel": np.ones((3, 2), np.float32), "steps": np.arange(3, dtype=np.int32)}}
    placed = place_variables(host, "bfloat16")
    assert isinstance(placed["params"]["kernel"], jax.Array) and placed["params"]["kernel"].dtype == jax.numpy.bfloat16
    assert placed["params"]["steps"].dtype == np.int32
    np.testing.assert_array_equal(placed["params"]["steps"], [0, 1, 2])
    kept = place_variables(placed)
    assert kept["params"]["kernel"] is placed["params"]["kernel"]
