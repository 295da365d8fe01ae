"""CLIP configs: `get_config("tiny" | "B/32" | "B/16" | "L/14" | "L/14-336" | "H/14")`.

`config.model` fills `dalle2_jax.models.clip.CLIP` by keyword. "tiny" is the
CPU model trained from scratch on the synthetic shapes set with a BPE
tokenizer trained by `dalle2_jax.tokenizer.train_bpe_tokenizer`; the others
have the shapes of the public OpenAI (B/32, B/16, L/14, L/14-336) and LAION
(H/14) checkpoints, which load with `dalle2_jax.convert.hf_clip.load_hf_clip`.

`config.data` and `config.eval` are read by `dalle2_jax.tasks.clip`: the
training set ("shapes", or an image "folder" / "webdataset" at `data.source`),
its tfds `data_dir` ("" = <workdir>/../data), the square size images are
loaded at (the model resizes them to `model.image_size`), the shapes build
settings, and the zero-shot evaluation's size.
"""
import math

import ml_collections

VARIANTS = ("tiny", "B/32", "B/16", "L/14", "L/14-336", "H/14")

# (embed_dim, text width/depth/heads, vision width/depth/heads, patch, image size, activation)
_PUBLIC = {
    "B/32": (512, 512, 12, 8, 768, 12, 12, 32, 224, "quick_gelu"),
    "B/16": (512, 512, 12, 8, 768, 12, 12, 16, 224, "quick_gelu"),
    "L/14": (768, 768, 12, 12, 1024, 24, 16, 14, 224, "quick_gelu"),
    "L/14-336": (768, 768, 12, 12, 1024, 24, 16, 14, 336, "quick_gelu"),
    "H/14": (1024, 1024, 24, 16, 1280, 32, 16, 14, 224, "gelu"),
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.compute_dtype = "float32"

    config.model = ml_collections.ConfigDict(dict(
        embed_dim=64,  # the prior's and decoder's tiny configs expect 64
        vocab_size=1024,
        context_length=32,
        text_width=128,
        text_depth=2,
        text_heads=4,
        text_mlp_dim=512,
        eos_token_id=1,  # tokenizer.train_bpe_tokenizer: <|pad|>=0, <|endoftext|>=1, <|startoftext|>=2
        text_pooling="eos",
        image_size=64,
        patch_size=16,  # 16 tokens of 16x16 pixels
        vision_width=128,
        vision_depth=3,
        vision_heads=4,
        vision_mlp_dim=512,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        activation="quick_gelu",
        layer_norm_eps=1e-5,
        # tiny: start at the temperature trained CLIPs end at (logit scale 100, the clamp). From
        # CLIP's 0.07 the tiny model learns a scale of ~17 and closes the modality gap (text-image
        # cosine 0.87), leaving a prior nothing to learn; at 100 the gap stays (cosine 0.63) as in
        # the public CLIPs, and the demo's prior takes it to 0.98. The public variants keep 0.07.
        logit_scale_init=math.log(100.0),
    ))
    config.model.dtype = config.get_ref("compute_dtype")

    config.tokenizer = ml_collections.ConfigDict(dict(
        vocab_size=config.model.get_ref("vocab_size"),
        context_length=config.model.get_ref("context_length"),
    ))

    config.data = ml_collections.ConfigDict(dict(
        name="shapes",
        source="",  # image folder or webdataset shard directory when name is "folder" / "webdataset"
        data_dir="",
        image_size=64,
        seed=0,  # of the shapes build, not of training
        num_train=20_000,
        num_test=1_000,
        num_test_unseen=500,
        augment="center_crop",  # or "random_crop"; data.pipeline.make_image_text_iterator
        random_flip=False,  # shapes captions say "left"/"right"
        worker_count=0,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        num_examples=1_000,  # per split, at most the split's size
        batch_size=250,
    ))

    # tiny: zero-shot colour 100%, shape 92% on shapes `test` after 600 steps; the demo trains 900
    # (shape 98.4%, ~100 s on 2 cores; dalle2_jax/demo.py).
    config.total_steps = 500
    config.batch_size = 64
    config.log_every = 50
    config.eval_every = 100
    config.checkpoint_every = 250
    config.keep_checkpoints = 2
    config.progress_bar = True
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_fsdp_size=2**18))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,
        warmup_steps=100,
        schedule="cosine",
        weight_decay=0.1,
        b1=0.9,
        b2=0.98,
        eps=1.0e-6,
        grad_clip_norm=1.0,
        grad_accum_steps=1,
    ))
    config.ema = ml_collections.ConfigDict(dict(decay=0.999, warmup=True))

    if variant in _PUBLIC:
        embed_dim, t_width, t_depth, t_heads, v_width, v_depth, v_heads, patch, size, act = _PUBLIC[variant]
        config.model.update(
            embed_dim=embed_dim,
            vocab_size=49408,
            context_length=77,
            text_width=t_width,
            text_depth=t_depth,
            text_heads=t_heads,
            text_mlp_dim=4 * t_width,
            eos_token_id=49407,
            image_size=size,
            patch_size=patch,
            vision_width=v_width,
            vision_depth=v_depth,
            vision_heads=v_heads,
            vision_mlp_dim=4 * v_width,
            activation=act,
            logit_scale_init=math.log(1 / 0.07),
        )
        config.data.image_size = size
        # OpenAI's recipe (Radford et al. 2021, Appendix F), for training from scratch.
        config.batch_size = 32_768
        config.total_steps = 400_000
        config.optimizer.update(learning_rate=5e-4, warmup_steps=2_000, weight_decay=0.2, b2=0.98)
        config.ema.decay = 0.9999
    return config
