"""UnCLIPPipeline on a tiny randomly initialised pipeline (the tiny configs shrunk further).

All calls use batches of 2 so that the stages' compiled programs are shared between methods:
the whole module compiles about a dozen small programs once (CLI tests reuse them in-process).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from dalle2_jax import UnCLIPPipeline, config_util
from dalle2_jax.pipeline import export_pipeline
from dalle2_jax.tokenizer import train_bpe_tokenizer

CAPTIONS = [f"a {size}{colour} {shape}" for size in ("", "small ", "large ")
            for colour in ("red", "green", "blue", "yellow", "purple", "orange")
            for shape in ("circle", "square", "triangle")]
OUT = 16  # the upsampler's resolution; the decoder samples 8x8


def tiny_configs() -> dict:
    """Stage configs small enough to compile in seconds (CLIP 16px, decoder 8px, upsampler 8 -> 16).

    The UNets predict x0: random ones then act like denoisers at high noise (eps = x_t / sqrt(1 - abar)),
    so DDIM inversion stays finite and samples do not saturate as with random eps predictions.
    """
    clip = config_util.load_config("configs/clip.py:tiny")
    clip.model.update(embed_dim=16, vocab_size=300, context_length=8, text_width=16, text_depth=1, text_heads=2,
                      text_mlp_dim=32, image_size=16, patch_size=8, vision_width=16, vision_depth=1,
                      vision_heads=2, vision_mlp_dim=32)
    clip.data.image_size = 16
    prior = config_util.load_config("configs/prior.py:tiny")
    prior.model.update(embed_dim=None, text_encoding_dim=None, max_text_len=None, width=32, depth=1, num_heads=2,
                       embed_scale=4.0)
    prior.diffusion.update(sampling_steps=2, num_candidates=2)
    decoder = config_util.load_config("configs/decoder.py:tiny")
    decoder.model.update(image_size=8, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                         attention_resolutions=(), head_dim=8, num_groups=4, num_context_tokens=2, context_dim=16)
    decoder.diffusion.update(sampling_steps=3, guidance_scale=3.0, objective="x0")
    upsampler = config_util.load_config("configs/upsampler.py:tiny")
    upsampler.low_res_size = 8
    upsampler.model.update(image_size=OUT, model_channels=8, channel_mult=(1,), num_res_blocks=1, num_groups=4)
    upsampler.diffusion.update(sampling_steps=2, objective="x0")
    return {"clip": clip, "prior": prior, "decoder": decoder, "upsampler": upsampler}


def tiny_pipeline(seed: int = 0) -> UnCLIPPipeline:
    tokenizer = train_bpe_tokenizer(CAPTIONS, vocab_size=300, context_length=8)
    return UnCLIPPipeline.from_configs(tiny_configs(), tokenizer=tokenizer, seed=seed)


def sample_image(colour=(220, 40, 40), size: int = 20) -> np.ndarray:
    image = np.full((size, size + 4, 3), 245, np.uint8)  # not square: centre-cropped
    image[5:15, 7:17] = colour
    return image


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def generated(pipe):
    return pipe.generate(["a red circle", "a blue square"], seed=0)


def check_images(images, count: int):
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8
    assert images.shape == (count, OUT, OUT, 3)
    assert images.std() > 1.0  # not a constant image


def test_generate_shapes_and_determinism(pipe, generated):
    check_images(generated, 2)
    np.testing.assert_array_equal(generated, pipe.generate(["a red circle", "a blue square"], seed=0))
    assert np.abs(generated.astype(int) - pipe.generate(["a red circle", "a blue square"], seed=1)).mean() > 1.0
    several = pipe.generate("a red circle", seed=0, num_images_per_prompt=2)
    check_images(several, 2)
    assert np.abs(several[0].astype(int) - several[1]).mean() > 1.0


def test_encoders_return_unit_embeddings(pipe, generated):
    text = pipe.encode_text(["a red circle", "a blue square"])
    images = pipe.encode_image(generated)
    assert text.shape == images.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(images, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(text[0], text[1])
    # A PIL image and a list of arrays give the rows of the batch.
    np.testing.assert_allclose(pipe.encode_image([Image.fromarray(generated[1]), generated[0]]), images[::-1],
                               atol=1e-6)


def test_variations(pipe):
    image = sample_image()
    fresh = pipe.variations(image, num_images=2, seed=0)
    check_images(fresh, 2)
    np.testing.assert_array_equal(fresh, pipe.variations(image, num_images=2, seed=0))
    assert np.abs(fresh[0].astype(int) - fresh[1]).mean() > 1.0
    # From the inverted x_T with eta > 0 (eta 0 is tested against text_diff's first frame).
    varied = pipe.variations(image, num_images=2, seed=0, invert=True)
    check_images(varied, 2)
    assert np.abs(varied[0].astype(int) - varied[1]).mean() > 1.0


def test_interpolate(pipe):
    red, blue = sample_image(), sample_image((40, 80, 220))
    frames = pipe.interpolate(red, blue, num_frames=2, seed=0)
    check_images(frames, 2)
    np.testing.assert_array_equal(frames, pipe.interpolate(red, blue, num_frames=2, seed=0))
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 1.0
    # The same image at both ends: every frame decodes the same embedding from the same x_T.
    still = pipe.interpolate(red, red, num_frames=2, seed=0)
    np.testing.assert_array_equal(still[0], still[1])
    check_images(pipe.interpolate(red, blue, num_frames=2, seed=0, slerp_noise=True), 2)


def test_text_diff_starts_from_the_reconstruction(pipe):
    image = sample_image()
    frames = pipe.text_diff(image, "a red circle", "a blue circle", num_frames=2, seed=0)
    check_images(frames, 2)
    np.testing.assert_array_equal(frames, pipe.text_diff(image, "a red circle", "a blue circle", num_frames=2))
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 1.0
    # theta = 0 is the image's own embedding decoded from its inverted x_T: variations(invert, eta=0)
    # (whose first row has the frames' upsampler noise).
    np.testing.assert_array_equal(frames[0], pipe.variations(image, num_images=2, invert=True, eta=0.0)[0])


def test_inpaint_keeps_the_known_pixels(pipe):
    image = sample_image((40, 170, 70), size=OUT)[:, 2:-2]  # square at the output size: no resizing
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[4:12, 4:12] = 255
    out = pipe.inpaint(image, mask, "a blue square", seed=0)  # one image, as the CLI (its programs are shared)
    check_images(out, 1)
    known = mask == 0
    for sample in out:
        np.testing.assert_array_equal(sample[known], image[known])
        assert np.abs(sample[~known].astype(int) - image[~known]).mean() > 1.0
    np.testing.assert_array_equal(out, pipe.inpaint(image, mask.astype(bool), "a blue square", seed=0))


def test_save_and_load_round_trip(pipe, generated, tmp_path):
    path = tmp_path / "model"
    pipe.save_pretrained(path)
    assert json.loads((path / "pipeline.json").read_text())["stages"] == ["clip", "prior", "decoder", "upsampler"]
    loaded = UnCLIPPipeline.from_pretrained(path)
    np.testing.assert_array_equal(loaded.generate(["a red circle", "a blue square"], seed=0), generated)
    pipe.save_pretrained(path)  # replaces its own directory
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_bad_inputs_name_the_argument(pipe, tmp_path):
    image = sample_image()
    cases = [
        (lambda: pipe.generate([]), ValueError, "prompts"),
        (lambda: pipe.generate(["a red circle", "  "]), ValueError, r"prompts\[1\]"),
        (lambda: pipe.generate(["a red circle", 3]), ValueError, r"prompts\[1\]"),
        (lambda: pipe.generate(["a red circle"], num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (lambda: pipe.generate(["a red circle"], seed=-1), ValueError, "seed"),
        (lambda: pipe.generate(["a red circle"], decoder_steps=0), ValueError, "decoder_steps"),
        (lambda: pipe.generate(["a red circle"], upsampler_steps=[1, 2]), ValueError, "upsampler_steps"),
        (lambda: pipe.encode_text([]), ValueError, "prompts"),
        (lambda: pipe.variations(image[..., 0]), ValueError, "image"),
        (lambda: pipe.variations(np.zeros((8, 8, 4), np.uint8)), ValueError, "image"),
        (lambda: pipe.variations(image.astype(np.float32)), ValueError, "image"),
        (lambda: pipe.variations(np.stack([image, image])), ValueError, "image"),
        (lambda: pipe.variations(str(tmp_path / "missing.png")), FileNotFoundError, "image"),
        (lambda: pipe.encode_image(np.zeros((2, 1, 8, 8, 3), np.uint8)), ValueError, "images"),
        (lambda: pipe.interpolate(image, image, num_frames=1), ValueError, "num_frames"),
        (lambda: pipe.interpolate(image, np.zeros((8, 8), np.uint8)), ValueError, "image_b"),
        (lambda: pipe.text_diff(image, "a red circle", "", num_frames=2), ValueError, "target_caption"),
        (lambda: pipe.text_diff(image, "a red circle", "a red circle"), ValueError, "target_caption"),
        (lambda: pipe.text_diff(image, 5, "a red circle"), ValueError, "source_caption"),
        (lambda: pipe.inpaint(image, np.zeros((8, 8), bool), "a blue square"), ValueError, "mask"),
        (lambda: pipe.inpaint(image, np.zeros(image.shape[:2], np.float32), "a blue square"), ValueError, "mask"),
        (lambda: pipe.inpaint(image, np.zeros(image.shape[:2], bool), ""), ValueError, "prompt"),
        (lambda: pipe.inpaint(image, np.zeros(image.shape[:2], bool), "a blue square"), ValueError, "empty mask"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()


def test_missing_or_corrupt_model_directories(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        UnCLIPPipeline.from_pretrained(tmp_path / "nowhere")
    good = tmp_path / "good"
    pipe.save_pretrained(good)

    def broken(name, damage):
        copy = tmp_path / name
        shutil.copytree(good, copy)
        damage(copy)
        return copy

    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        UnCLIPPipeline.from_pretrained(broken("no_manifest", lambda d: os.remove(d / "pipeline.json")))
    with pytest.raises(ValueError, match="corrupt"):
        UnCLIPPipeline.from_pretrained(broken("bad_manifest", lambda d: (d / "pipeline.json").write_text("{")))
    with pytest.raises(FileNotFoundError, match="decoder"):
        UnCLIPPipeline.from_pretrained(broken("no_decoder", lambda d: shutil.rmtree(d / "decoder")))
    with pytest.raises(FileNotFoundError, match="params"):
        UnCLIPPipeline.from_pretrained(broken("no_params", lambda d: shutil.rmtree(d / "prior" / "params")))

    def scramble(directory):
        for root, _, files in os.walk(directory / "decoder" / "params"):
            for file in files:
                with open(os.path.join(root, file), "wb") as f:
                    f.write(b"not a checkpoint")

    with pytest.raises(ValueError, match="corrupt"):
        UnCLIPPipeline.from_pretrained(broken("bad_params", scramble))

    def widen(directory):
        config = json.loads((directory / "decoder" / "config.json").read_text())
        config["model"]["model_channels"] = 16
        (directory / "decoder" / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="decoder: parameters do not fit"):
        UnCLIPPipeline.from_pretrained(broken("wrong_shapes", widen))
    with pytest.raises(ValueError, match="path"):
        pipe.save_pretrained(tmp_path / "no_manifest")  # not a pipeline directory any more: kept


def test_export_from_training_workdirs(pipe, generated, tmp_path):
    """Workdirs as the training loop leaves them (config.json, checkpoints/<step>/ with the EMA
    parameters, CLIP's tokenizer/) export to a pipeline that samples as the original."""
    from dalle2_jax import checkpoint

    root = tmp_path / "run"
    for stage in pipe.stages:
        workdir = root / stage.name
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(stage.config.to_json_best_effort())
        params = jax.tree.map(np.asarray, stage.variables["params"])
        zeros = jax.tree.map(np.zeros_like, params)
        with checkpoint.Checkpointer(workdir / "checkpoints", async_save=False) as saver:
            saver.save(3, {"params": zeros, "ema_params": params, "step": np.int32(3)})
    pipe.tokenizer.save(root / "clip" / "tokenizer")
    export_pipeline(root, tmp_path / "exported")
    exported = UnCLIPPipeline.from_pretrained(tmp_path / "exported")
    np.testing.assert_array_equal(exported.generate(["a red circle", "a blue square"], seed=0), generated)
    with pytest.raises(FileNotFoundError, match="root_workdir"):
        export_pipeline(tmp_path / "nowhere", tmp_path / "out")
    shutil.rmtree(root / "prior")
    with pytest.raises(FileNotFoundError, match="prior"):
        export_pipeline(root, tmp_path / "out")


def test_prior_trained_on_cut_text_sees_only_those_positions(pipe):
    """A prior trained with config.data.text_len = N samples from the first N token positions
    only: the unconditional half of guidance never meets the untrained null tokens beyond N,
    and a caption longer than N is refused, named."""
    import dataclasses

    import ml_collections

    lengths = pipe.tokenizer(["a red circle", "a small red circle"])["attention_mask"].sum(axis=1)
    text_len = int(lengths[0])
    assert lengths[1] > text_len and text_len < pipe.clip.module.context_length

    def with_prior(text_len, null_shift=0.0):
        config = ml_collections.ConfigDict(pipe.prior.config.to_dict())
        config.data.text_len = text_len
        params = jax.tree.map(np.asarray, pipe.prior.variables)
        null = params["params"]["null_text_encodings"].copy()
        # Not a constant shift: the blocks' LayerNorms would remove it.
        null[int(lengths[0]):] += null_shift * np.random.default_rng(0).standard_normal(null[int(lengths[0]):].shape)
        params["params"]["null_text_encodings"] = null
        prior = dataclasses.replace(pipe.prior, config=config, variables=params)
        return UnCLIPPipeline([pipe.clip, prior, pipe.decoder, *pipe.upsamplers], pipe.tokenizer)

    options = dict(seed=0, prior_guidance_scale=4.0, decoder_steps=2, upsampler_steps=1)
    cut = with_prior(text_len).generate(["a red circle", "a red circle"], **options)
    np.testing.assert_array_equal(cut, with_prior(text_len, null_shift=3.0).generate(
        ["a red circle", "a red circle"], **options))
    full = with_prior(None).generate(["a red circle", "a red circle"], **options)
    assert np.abs(full.astype(int) - with_prior(None, null_shift=3.0).generate(
        ["a red circle", "a red circle"], **options)).mean() > 1.0
    with pytest.raises(ValueError, match=r"prompts\[1\].*config.data.text_len"):
        with_prior(text_len).generate(["a red circle", "a small red circle"], **options)
    with pytest.raises(ValueError, match=r"prompt:.*config.data.text_len"):
        with_prior(text_len).inpaint(sample_image(), np.ones((20, 24), bool), "a small red circle", **options)


# ---------------------------------------------------------------- what each operation means
# Random weights decode noise-dominated images (a random CLIP puts the variations of two seeds of one
# image further apart than those of a red and a blue image: 0.018 against 0.002 cosine distance), so
# the semantics are checked where they are decided: the embeddings and captions each stage is handed
# (recorded at sampling.decode_images / inpaint_images and the prior's sampler), and the images
# wherever two calls must agree exactly.


@pytest.fixture
def recorded(monkeypatch):
    """The keyword arguments of every decoder and prior sampling call the pipeline makes."""
    import inspect

    from dalle2_jax import sampling
    from dalle2_jax.models import prior as prior_lib

    calls = {"decoder": [], "prior": []}

    def spy(kind, original):
        def record(*args, **kwargs):
            out = original(*args, **kwargs)
            signature = inspect.signature(original)
            bound = dict(signature.bind(*args, **kwargs).arguments)
            for name, parameter in signature.parameters.items():  # **kwargs flattened
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    bound.update(bound.pop(name, {}))
            arrays = {k: np.asarray(v) for k, v in bound.items()
                      if isinstance(v, (np.ndarray, jax.Array)) and k != "rng"}
            calls[kind].append({**arrays, "drop_text": bound.get("drop_text", False), "out": np.asarray(out)})
            return out
        return record

    for name in ("decode_images", "inpaint_images"):
        monkeypatch.setattr(sampling, name, spy("decoder", getattr(sampling, name)))
    monkeypatch.setattr(prior_lib, "sample_image_embeddings_jit",
                        spy("prior", prior_lib.sample_image_embeddings_jit))
    return calls


def test_generate_conditions_each_row_on_its_caption(pipe, recorded):
    prompts = ["a red circle", "a blue square"]
    images = pipe.generate(prompts, seed=0)
    (prior,), (decoder,) = recorded["prior"], recorded["decoder"]
    np.testing.assert_allclose(prior["text_embed"][:2], pipe.encode_text(prompts), atol=1e-6)
    # The decoder draws row k from the prior's sample for caption k, with caption k's tokens.
    np.testing.assert_array_equal(decoder["image_embed"], prior["out"][:2])
    assert not decoder["drop_text"] and not np.allclose(decoder["text_encodings"][0], decoder["text_encodings"][1])
    recorded["decoder"].clear()
    swapped = pipe.generate(prompts[::-1], seed=0)
    np.testing.assert_array_equal(recorded["decoder"][0]["text_encodings"], decoder["text_encodings"][::-1])
    assert np.abs(swapped.astype(int) - images).mean() > 1.0


@pytest.mark.parametrize("invert", [False, True])
def test_variations_decode_the_input_images_embedding(pipe, recorded, invert):
    red, blue = sample_image(), sample_image((40, 80, 220))
    varied = pipe.variations(red, num_images=2, seed=0, invert=invert)
    decoded = recorded["decoder"][-1]
    np.testing.assert_allclose(decoded["image_embed"], np.repeat(pipe.encode_image(red), 2, axis=0), atol=1e-6)
    assert decoded["drop_text"]  # no caption: the decoder's text is dropped in both guidance halves
    assert np.abs(pipe.variations(blue, num_images=2, seed=0, invert=invert).astype(int) - varied).mean() > 1.0


def test_text_diff_moves_the_embedding_toward_the_target_caption(pipe, recorded):
    image, source, target = sample_image(), "a red circle", "a blue circle"
    z_i = pipe.encode_image(image)[0].astype(np.float64)
    z_s, z_t = pipe.encode_text([source, target]).astype(np.float64)
    direction = (z_t - z_s) / np.linalg.norm(z_t - z_s)
    embeds = []
    for max_theta in (0.25, 0.5, 1.0):  # two frames per call: theta 0 and max_theta (the programs of batch 2)
        pipe.text_diff(image, source, target, num_frames=2, max_theta=max_theta)
        first, last = recorded["decoder"][-1]["image_embed"].astype(np.float64)
        np.testing.assert_allclose(first, z_i, atol=1e-6)  # frame 0: the image's own embedding
        embeds.append(last)
    # Toward the target and away from the source, monotonically; theta 1 is the text diff itself.
    toward = [float(e @ (z_t - z_s)) for e in [z_i, *embeds]]
    assert all(b > a + 1e-3 for a, b in zip(toward, toward[1:])), toward
    np.testing.assert_allclose(embeds[-1], direction, atol=1e-5)


def test_interpolate_ends_at_each_images_decode(pipe):
    red, blue, green = sample_image(), sample_image((40, 80, 220)), sample_image((40, 170, 70))
    # From the slerp of the inverted x_T: the ends are the eta-0 decodes of each image's own x_T
    # (variations with invert=True, eta=0; inverted in a batch of one there: measured <= 2 levels apart).
    frames = pipe.interpolate(red, blue, num_frames=2, seed=0, slerp_noise=True)
    own_a, own_b = (pipe.variations(image, num_images=2, invert=True, eta=0.0)[0] for image in (red, blue))
    assert np.abs(own_a.astype(int) - own_b).mean() > 10.0  # measured 42
    assert np.abs(frames[0].astype(int) - own_a).max() <= 3
    assert np.abs(frames[-1].astype(int) - own_b).max() <= 3
    # From one shared x_T: each end depends on its own image alone.
    frames = pipe.interpolate(red, blue, num_frames=2, seed=0)
    np.testing.assert_array_equal(frames[0], pipe.interpolate(red, green, num_frames=2, seed=0)[0])
    np.testing.assert_array_equal(frames[-1], pipe.interpolate(green, blue, num_frames=2, seed=0)[-1])


def test_inpaint_generates_from_the_known_region(pipe, recorded):
    image = sample_image((40, 170, 70), size=OUT)[:, 2:-2]
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[4:12, 4:12] = 255
    known = mask == 0
    out = pipe.inpaint(image, mask, "a blue square", seed=0)[0]
    (prior,), (decoder,) = recorded["prior"], recorded["decoder"]
    np.testing.assert_array_equal(decoder["image_embed"], prior["out"][:1])  # the prompt's prior sample
    # RePaint shows the decoder the known pixels at every step: other known pixels, another fill (at the
    # decoder's own resolution: the upsampler's convolutions alone would carry the change in too).
    other = image.copy()
    other[known] = 255 - other[known]
    refilled = pipe.inpaint(other, mask, "a blue square", seed=0)[0]
    np.testing.assert_array_equal(refilled[known], other[known])
    region = decoder["mask"].reshape(decoder["out"].shape[:3])
    fill, other_fill = decoder["out"][region], recorded["decoder"][-1]["out"][region]
    assert np.abs(fill - other_fill).mean() > 0.05  # measured 0.69 in [-1, 1] units
