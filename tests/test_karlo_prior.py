"""Karlo's prior: diffusers' PriorTransformer -> our DiffusionPrior (converter + module options), parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax.convert.karlo_prior import convert_prior, prior_config_from_diffusers
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.pipeline.stages import build_module

import torch  # the reference; installed by the dev extra
import diffusers  # the reference; installed by the dev extra

pytestmark = pytest.mark.parity

TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=7,
            additional_embeddings=4, time_embed_dim=24)


def tiny_prior(seed=0):
    """A random PriorTransformer with nothing left at its zero init (clip_mean/std, positions, prd)."""
    torch.manual_seed(seed)
    model = diffusers.PriorTransformer(**TINY).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "clip_std":
                param.copy_(0.5 + torch.rand_like(param))
            elif "norm" in name or name.endswith("bias") or name in ("positional_embedding", "prd_embedding",
                                                                      "clip_mean"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [7, 4, 2, 1][:batch]
    mask = np.zeros((batch, TINY["num_embeddings"]), bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    return dict(
        x=rng.standard_normal((batch, 12)).astype(np.float32),
        t=np.array([0, 17, 500, 999][:batch], np.int64),
        text_embed=(3.0 * rng.standard_normal((batch, 12))).astype(np.float32),  # unnormalised z_t
        text_encodings=rng.standard_normal((batch, 7, 12)).astype(np.float32),
        text_mask=mask)


def test_converted_prior_matches_prior_transformer():
    reference = tiny_prior()
    config = prior_config_from_diffusers(dict(reference.config), {"prediction_type": "sample",
                                                                  "clip_sample_range": 5.0})
    module = build_module("prior", config)
    variables = convert_prior(_state(reference), config)
    inputs = _inputs()
    with torch.no_grad():
        expected = reference(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["t"]),
                             proj_embedding=torch.from_numpy(inputs["text_embed"]),
                             encoder_hidden_states=torch.from_numpy(inputs["text_encodings"]),
                             attention_mask=torch.from_numpy(inputs["text_mask"])).predicted_image_embedding.numpy()
        post = reference.post_process_latents(torch.from_numpy(inputs["x"])).numpy()
    @jax.jit
    def ours(variables, x, t, text_embed, text_encodings, text_mask):
        full = module.apply(variables, x, t, text_embed=text_embed, text_encodings=text_encodings,
                            text_mask=text_mask)
        # The cached-text path (what sampling runs) gives the same.
        cache = module.apply(variables, text_embed, text_encodings, text_mask, method="encode_text")
        cached = module.apply(variables, x, t, text_cache=cache, method="denoise")
        unnormalized = module.apply(variables, x, method="unnormalize_embed")
        return full, cached, unnormalized, module.apply(variables, unnormalized, method="normalize_embed")

    got, cached, unnormalized, roundtrip = ours(variables, inputs["x"], jnp.asarray(inputs["t"], jnp.int32),
                                                inputs["text_embed"], inputs["text_encodings"], inputs["text_mask"])
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(np.asarray(cached), expected, atol=1e-4, rtol=0)
    # Karlo's embedding normalisation: samples come back as x * clip_std + clip_mean.
    np.testing.assert_allclose(np.asarray(unnormalized), post, atol=1e-6)
    np.testing.assert_allclose(np.asarray(roundtrip), inputs["x"], atol=1e-5)


def test_karlo_prior_samples_match_the_reference_loop():
    """Guided against the empty caption, ddpm with x0 clipped to 5, as UnCLIPPipeline's prior loop."""
    from diffusers.schedulers import scheduling_unclip

    from dalle2_jax import diffusion

    reference = tiny_prior(1)
    config = prior_config_from_diffusers(dict(reference.config), {"prediction_type": "sample",
                                                                  "clip_sample_range": 5.0})
    module = build_module("prior", config)
    variables = convert_prior(_state(reference), config)
    inputs = _inputs(batch=2)
    null = _inputs(batch=4, seed=1)
    null_text = (null["text_embed"][3], null["text_encodings"][3], null["text_mask"][3])
    steps, scale = 4, 4.0
    rng = jax.random.key(3)
    x_T = np.random.default_rng(5).standard_normal((2, 12)).astype(np.float32)
    sched = diffusion.respace(diffusion.make_schedule("cosine", 1000), steps)
    got = prior_lib.sample_image_embeddings(
        module, variables, rng, text_embed=inputs["text_embed"], text_encodings=inputs["text_encodings"],
        text_mask=inputs["text_mask"], schedule=sched, steps=steps, sampler="ddpm", guidance_scale=scale,
        num_candidates=1, null_text=null_text, clip_range=5.0, x_T=x_T)

    _, sample_key = jax.random.split(rng)
    noises = iter([np.asarray(diffusion.step_noise(sample_key, i, (2, 12))) for i in range(steps - 1, 0, -1)])
    scheduler = scheduling_unclip.UnCLIPScheduler(prediction_type="sample", clip_sample_range=5.0)
    scheduler.betas = torch.from_numpy(diffusion.cosine_betas(1000))  # see test_unclip_scheduler
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.set_timesteps(steps)
    both = {k: torch.from_numpy(np.concatenate([np.repeat(np.asarray(v)[None], 2, 0), inputs[k]]))
            for k, v in zip(("text_embed", "text_encodings", "text_mask"), null_text)}
    original = scheduling_unclip.randn_tensor
    scheduling_unclip.randn_tensor = lambda shape, **kwargs: torch.from_numpy(next(noises).copy())
    try:
        latents = torch.from_numpy(x_T.copy())
        timesteps = scheduler.timesteps
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                out = reference(torch.cat([latents] * 2), timestep=t, proj_embedding=both["text_embed"],
                                encoder_hidden_states=both["text_encodings"],
                                attention_mask=both["text_mask"]).predicted_image_embedding
                uncond, cond = out.chunk(2)
                guided = uncond + scale * (cond - uncond)
                prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
                latents = scheduler.step(guided, timestep=t, sample=latents, prev_timestep=prev).prev_sample
            expected = reference.post_process_latents(latents).numpy()
    finally:
        scheduling_unclip.randn_tensor = original
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_convert_prior_names_missing_and_misshapen_weights():
    reference = tiny_prior()
    config = prior_config_from_diffusers(dict(reference.config))
    state = _state(reference)
    del state["proj_in.weight"]
    state["norm_out.weight"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"prior/diffusion_pytorch_model.safetensors.*missing keys \['proj_in"
                                         r"\.weight'\].*norm_out\.weight: file \(5,\)"):
        convert_prior(state, config, file="prior/diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="prior/config.json: norm_in_type 'layer' is not supported"):
        prior_config_from_diffusers({**reference.config, "norm_in_type": "layer"})
    module = build_module("prior", config)
    with pytest.raises(ValueError, match="drop_text: this prior has no learned null text"):
        module.init(jax.random.key(0), jnp.zeros((1, 12)), jnp.zeros((1,), jnp.int32),
                    text_embed=jnp.zeros((1, 12)), text_encodings=jnp.zeros((1, 7, 12)),
                    text_mask=jnp.ones((1, 7), bool), drop_text=jnp.zeros((1,), bool))
