"""The diffusers UnCLIP reader's errors, .bin weights, save_pretrained into this project's format
(loads without torch), `dalle2-jax convert unclip` and bfloat16 inference of an imported model."""
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import torch  # the reference; installed by the dev extra

import karlo_fixture  # noqa: E402
from dalle2_jax import UnCLIPPipeline, cli  # noqa: E402
from dalle2_jax.convert import unclip as unclip_import  # noqa: E402

PROMPT = "a big red frog on a green leaf"


@pytest.fixture(scope="module")
def karlo_dir(tmp_path_factory):
    reference = karlo_fixture.Reference(variations=False, seed=40)
    return reference.write(tmp_path_factory.mktemp("karlo") / "karlo-tiny", text_proj_library="unclip")


@pytest.fixture
def copy_of(karlo_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(karlo_dir, target)
    return target


def _edit_index(root, **changes):
    index = json.loads((root / "model_index.json").read_text())
    index.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del index[key]
    (root / "model_index.json").write_text(json.dumps(index))


def test_unknown_pipeline_class_is_named(copy_of):
    _edit_index(copy_of, _class_name="StableDiffusionPipeline")
    with pytest.raises(ValueError, match=r"model_index.json has _class_name 'StableDiffusionPipeline'; expected one "
                                         r"of \('UnCLIPPipeline', 'UnCLIPImageVariationPipeline'\)"):
        UnCLIPPipeline.from_pretrained(copy_of)


def test_unknown_component_class_is_named(copy_of):
    _edit_index(copy_of, decoder=["diffusers", "UNet2DModel"])
    with pytest.raises(ValueError, match=r"component 'decoder' has class 'UNet2DModel'; expected one of "
                                         r"\('UNet2DConditionModel',\)"):
        UnCLIPPipeline.from_pretrained(copy_of)


def test_missing_component_is_named(copy_of):
    _edit_index(copy_of, prior=None)
    with pytest.raises(ValueError, match=r"\(UnCLIPPipeline\) lacks the components \['prior'\]"):
        UnCLIPPipeline.from_pretrained(copy_of)
    shutil.rmtree(copy_of / "text_proj")
    _edit_index(copy_of, prior=["diffusers", "PriorTransformer"])
    with pytest.raises(FileNotFoundError, match=r"text_proj/config.json"):
        UnCLIPPipeline.from_pretrained(copy_of)


def test_wrong_shape_and_damaged_weights_are_named(copy_of):
    import safetensors.numpy

    file = copy_of / "prior" / "diffusion_pytorch_model.safetensors"
    state = safetensors.numpy.load_file(str(file))
    state["proj_in.weight"] = np.zeros((3, 5), np.float32)
    safetensors.numpy.save_file(state, str(file))
    with pytest.raises(ValueError, match=r"prior/diffusion_pytorch_model.safetensors.*proj_in\.weight: file \(3, 5\)"):
        UnCLIPPipeline.from_pretrained(copy_of)
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"prior/diffusion_pytorch_model.safetensors is corrupt"):
        UnCLIPPipeline.from_pretrained(copy_of)


def test_torch_bin_weights_load_with_torch_and_fail_clearly_without(copy_of, karlo_dir, monkeypatch):
    import safetensors.numpy

    file = copy_of / "prior" / "diffusion_pytorch_model.safetensors"
    state = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(str(file)).items()}
    file.unlink()
    torch.save(state, copy_of / "prior" / "diffusion_pytorch_model.bin")
    from_bin, _ = unclip_import.read_weights(copy_of / "prior")
    from_safetensors, _ = unclip_import.read_weights(karlo_dir / "prior")
    assert set(from_bin) == set(from_safetensors)
    for key, value in from_safetensors.items():
        np.testing.assert_array_equal(from_bin[key], value)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as without torch installed
    with pytest.raises(ValueError, match=r"prior/diffusion_pytorch_model.bin is a PyTorch pickle, which needs torch"):
        unclip_import.read_weights(copy_of / "prior")


def test_import_reads_each_tensor_once_and_places_it_in_the_dtype(karlo_dir, monkeypatch):
    """The import streams: every tensor of every weight file is read exactly once, and every
    parameter ends on the device in the requested dtype (no NumPy copy of the model is kept)."""
    from dalle2_jax.convert import state_dict

    reads = []
    original = state_dict.SafetensorsFile.__getitem__
    monkeypatch.setattr(state_dict.SafetensorsFile, "__getitem__",
                        lambda self, key: reads.append((self.file.parent.name, key)) or original(self, key))
    stages, _ = unclip_import.read_unclip_dir(karlo_dir, "bfloat16")
    stored = {(file.parent.name, key) for file in karlo_dir.glob("*/*.safetensors")
              for key in state_dict.SafetensorsFile(file)}
    assert sorted(reads) == sorted(stored)
    for stage in stages:
        for leaf in jax.tree.leaves(stage.variables):
            assert isinstance(leaf, jax.Array), stage.name
            assert leaf.dtype == jax.numpy.bfloat16 or not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)

@pytest.mark.heavy
def test_convert_cli_save_pretrained_and_bfloat16(karlo_dir, tmp_path):
    """`dalle2-jax convert unclip` in float32 and bfloat16; the written pipelines load without torch,
    the float32 one generates what the directory itself generates, bfloat16 stays close to it."""
    out32, out16 = tmp_path / "karlo-jax", tmp_path / "karlo-jax-bf16"
    assert cli.main(["convert", "unclip", str(karlo_dir), "--out", str(out32)]) == 0
    assert cli.main(["convert", "unclip", str(karlo_dir), "--out", str(out16), "--dtype", "bfloat16"]) == 0
    check = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
             "from dalle2_jax import UnCLIPPipeline\n"
             f"pipe = UnCLIPPipeline.from_pretrained({str(out16)!r})\n"
             "import jax; print(sorted({str(l.dtype) for l in jax.tree.leaves(pipe.prior.variables)}))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['bfloat16']"

    rng = np.random.default_rng(0)
    latents = dict(prior_latents=rng.standard_normal((1, karlo_fixture.EMBED)).astype(np.float32),
                   decoder_latents=rng.standard_normal((1, 16, 16, 3)).astype(np.float32),
                   super_res_latents=rng.standard_normal((1, 32, 32, 3)).astype(np.float32))
    steps = dict(prior_steps=3, decoder_steps=3, upsampler_steps=3)
    direct = UnCLIPPipeline.from_pretrained(karlo_dir)
    saved = UnCLIPPipeline.from_pretrained(out32)
    for ours, theirs in zip(saved.stages, direct.stages):  # the written pipeline is the converted one exactly
        assert ours.name == theirs.name
        for a, b in zip(jax.tree.leaves(ours.variables), jax.tree.leaves(theirs.variables), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    float32 = direct.generate([PROMPT], seed=0, **steps, **latents)
    bf16 = UnCLIPPipeline.from_pretrained(out16).generate([PROMPT], seed=0, **steps, **latents)
    difference = np.abs(bf16.astype(np.float64) - float32) / 255.0
    print(f"bfloat16 vs float32: mean {difference.mean():.4f}, p95 {np.quantile(difference, 0.95):.4f}, "
          f"max {difference.max():.4f}")
    assert difference.mean() <= BF16_MEAN_TOLERANCE
    assert np.quantile(difference, 0.95) <= BF16_P95_TOLERANCE


# bfloat16 keeps 8 bits of mantissa (~0.4% per matmul) through CLIP, the prior, the decoder and the
# upsampler. Measured on this tiny random model: mean 0.0051 (1.3/255); single pixels can flip
# (max 0.96) where a random UNet's x0 crosses the clip range at t = 999, so the max is not bounded.
BF16_MEAN_TOLERANCE = 0.02
BF16_P95_TOLERANCE = 0.05
