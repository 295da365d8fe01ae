"""UnCLIPPipeline with the autoregressive prior as its "prior" stage (config kind "ar")."""
import dataclasses

import jax
import numpy as np
import pytest

from dalle2_jax import UnCLIPPipeline, config_util
from dalle2_jax.models.ar_prior import ARPrior
from dalle2_jax.tokenizer import train_bpe_tokenizer
from test_pipeline import CAPTIONS, OUT, check_images, sample_image, tiny_configs

NUM_COMPONENTS = 6


@pytest.fixture(scope="module")
def pipe():
    configs = tiny_configs()
    prior = config_util.load_config("configs/ar_prior.py:tiny")
    prior.model.update(width=32, depth=1, num_heads=2, num_components=NUM_COMPONENTS, num_buckets=16,
                       num_dot_buckets=4)
    configs["prior"] = prior
    random = UnCLIPPipeline.from_configs(configs, tokenizer=train_bpe_tokenizer(CAPTIONS, vocab_size=300,
                                                                                context_length=8))
    # A quantizer whose components are the first coordinate axes: every embedding it decodes is
    # zero beyond them, whatever tokens the prior draws.
    dim = random.prior.module.embed_dim
    quantizer = {"mean": np.zeros(dim, np.float32), "components": np.eye(NUM_COMPONENTS, dim, dtype=np.float32),
                 "low": np.full(NUM_COMPONENTS, -1.0, np.float32), "high": np.ones(NUM_COMPONENTS, np.float32)}
    prior_stage = dataclasses.replace(random.prior, variables={**jax.device_get(random.prior.variables),
                                                               "quantizer": quantizer})
    return UnCLIPPipeline([random.clip, prior_stage, random.decoder, *random.upsamplers], random.tokenizer)


def test_the_pipeline_samples_the_ar_prior_and_round_trips(pipe, tmp_path):
    assert isinstance(pipe.prior.module, ARPrior) and pipe.prior.config.kind == "ar"
    text = pipe._text(["a red circle", "a blue square", "a green triangle"])
    embeds = np.asarray(pipe._sample_prior(text, seed=0, steps=None, guidance_scale=None))
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(embeds[:, NUM_COMPONENTS:], 0.0)
    assert len(np.unique(np.round(embeds[:, :NUM_COMPONENTS], 6))) > 4
    other = np.asarray(pipe._sample_prior(text, seed=1, steps=None, guidance_scale=3.0))
    assert not np.allclose(other, embeds)

    images = pipe.generate(["a red circle", "a blue square"], seed=0)
    check_images(images, 2)
    np.testing.assert_array_equal(images, pipe.generate(["a red circle", "a blue square"], seed=0))
    pipe.save_pretrained(tmp_path / "ar_pipe")
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "ar_pipe")
    assert isinstance(loaded.prior.module, ARPrior)
    np.testing.assert_array_equal(np.asarray(loaded.prior.variables["quantizer"]["components"]),
                                  np.eye(NUM_COMPONENTS, pipe.prior.module.embed_dim))
    np.testing.assert_array_equal(loaded.generate(["a red circle", "a blue square"], seed=0), images)


def test_inpaint_with_the_ar_prior(pipe):
    """(text_diff takes no prior: its captions only give z_t, so the prior stage's kind cannot matter.)"""
    image = sample_image((40, 170, 70), size=OUT)[:, 2:-2]
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[4:12, 4:12] = 255
    out = pipe.inpaint(image, mask, "a blue square", seed=0)
    check_images(out, 1)
    np.testing.assert_array_equal(out[0][mask == 0], image[mask == 0])
    assert np.abs(out[0][mask > 0].astype(int) - image[mask > 0]).mean() > 1.0
