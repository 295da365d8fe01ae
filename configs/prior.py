"""Diffusion prior configs: `get_config("tiny" | "base" | "paper" | "bench")`.

`config.model` fills `dalle2_jax.models.prior.DiffusionPrior` by keyword.
Training numbers of the `paper` variant follow Ramesh et al. 2022, Appendix C,
Table 3 (prior column).

`config.data` and `config.eval` are read by `dalle2_jax.tasks.prior`: CLIP
embedding directories (`dalle2-jax embed` or clip-retrieval), "" meaning
<workdir>/../embeddings/train for the training set and a sibling of it named
like the split for each evaluation set. `model.embed_dim`, `text_encoding_dim`
and `max_text_len` set to None are read from the training set; the tiny
variant's values are those of the tiny CLIP (configs/clip.py).
"""
import math

import ml_collections

VARIANTS = ("tiny", "base", "paper", "bench", "karlo")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.compute_dtype = "float32"

    config.model = ml_collections.ConfigDict(dict(
        embed_dim=128,
        text_encoding_dim=128,
        max_text_len=32,
        width=256,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        time_embed_dim=None,
        dropout=0.0,
        embed_scale=math.sqrt(128),
        objective="x0",
    ))
    config.model.dtype = config.get_ref("compute_dtype")

    config.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine",
        num_timesteps=1000,
        sampling_steps=64,
        sampler="ddim",
        eta=0.0,
        guidance_scale=4.0,  # Karlo's prior default
        num_candidates=2,  # paper: keep the better of 2 by dot product with z_t
        text_drop_prob=0.1,
    ))
    config.diffusion.objective = config.model.get_ref("objective")
    config.diffusion.embed_scale = config.model.get_ref("embed_scale")

    config.data = ml_collections.ConfigDict(dict(
        train_dir="",  # "" = <workdir>/../embeddings/train
        eval_dirs=ml_collections.ConfigDict(dict(test="", test_unseen="")),  # "" = <train_dir>/../<name>
        use_text_encodings=None,  # None: when the training set stores them
        text_len=None,  # train on the first N token positions (all real tokens must fit); None: all
        worker_count=0,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        num_examples=256,  # per evaluation set, at most its size
        batch_size=256,
        seed=0,
    ))

    config.total_steps = 20_000
    config.batch_size = 256
    config.log_every = 100
    config.eval_every = 2_000
    config.checkpoint_every = 2_000
    config.keep_checkpoints = 3
    config.progress_bar = True
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_fsdp_size=2**18))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1.1e-4,
        warmup_steps=1_000,
        schedule="cosine",
        weight_decay=6.0e-2,
        b1=0.9,
        b2=0.96,
        eps=1.0e-6,
        grad_clip_norm=1.0,
        grad_accum_steps=1,
    ))
    config.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=True))

    if variant == "base":
        config.model.update(embed_dim=512, text_encoding_dim=512, max_text_len=77, width=768, depth=12,
                            num_heads=12, embed_scale=math.sqrt(512))
        config.total_steps = 200_000
        config.batch_size = 512
        config.optimizer.warmup_steps = 5_000
    elif variant == "paper":
        # ViT-H/16 CLIP: 1024-d embeddings and text encodings. A 4x MLP at width 2048 and
        # 24 layers is 1.21B parameters; 3x (6144 hidden) lands on the paper's 1.0B (1.02B).
        config.model.update(embed_dim=1024, text_encoding_dim=1024, max_text_len=77, width=2048, depth=24,
                            num_heads=32, mlp_ratio=3.0, embed_scale=17.2)
        config.total_steps = 600_000
        config.batch_size = 4096
        config.optimizer.warmup_steps = 10_000
        config.mesh.fsdp = 8
    elif variant == "karlo":
        # Karlo v1 alpha's prior (diffusers' PriorTransformer defaults, ViT-L/14 CLIP): 20 layers of
        # width 2048, 32 heads, 81 positions, x0 prediction on clip_mean/clip_std-standardised
        # embeddings, raw z_t, the empty caption as the unconditional text, x0 clipped to +-5.
        # Fine-tune imported weights with --config.init_from=DIR (a converted pipeline or the
        # diffusers directory); the data must hold raw (not unit-normalised) CLIP embeddings.
        from dalle2_jax.convert.karlo_prior import KARLO_PRIOR_CONFIG, KARLO_PRIOR_SCHEDULER, prior_config_from_diffusers

        karlo = prior_config_from_diffusers(KARLO_PRIOR_CONFIG, KARLO_PRIOR_SCHEDULER)
        config.model.update({k: v for k, v in karlo.model.to_dict().items() if k != "dtype"})
        config.diffusion.update({k: v for k, v in karlo.diffusion.to_dict().items() if k != "objective"})
        config.data.text_len = None
        config.batch_size = 64
        config.total_steps = 1_000
        config.optimizer.update(learning_rate=1.0e-5, warmup_steps=100)
        config.init_from = ""
    elif variant == "tiny":
        # The demo's prior (400 steps, guidance 2), cosine to the true image embeddings on test /
        # test_unseen: DDIM 64 steps 0.9717 / 0.9553, dpm++2m 10 steps 0.9741 / 0.9569 (5 steps:
        # 0.9741 / 0.9566; unipc 10: 0.9739 / 0.9569): the same at a sixth of the evaluations.
        # base / paper keep the paper's 64 DDIM steps (not measured at their scale).
        config.diffusion.update(sampler="dpm++2m", sampling_steps=10)
    elif variant == "bench":
        config.model.update(embed_dim=512, text_encoding_dim=512, max_text_len=77, width=512, depth=6,
                            num_heads=8, embed_scale=math.sqrt(512))
        config.batch_size = 64
        config.bench = ml_collections.ConfigDict(dict(num_samples=16))
    return config
