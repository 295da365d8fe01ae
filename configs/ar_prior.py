"""Autoregressive prior configs: `get_config("tiny" | "paper")`.

`config.model` fills `dalle2_jax.models.ar_prior.ARPrior` by keyword; `config.kind = "ar"` is
what tells a pipeline directory's "prior" stage apart from the diffusion prior. Sizes left None
(embed_dim, text_encoding_dim, max_text_len) are read from the training set, as in
configs/prior.py, whose `data` and `eval` sections these share (`dalle2_jax.tasks.ar_prior`).

num_components: the paper keeps 319 principal components of ViT-H/16's 1024-d embeddings; the
tiny variant keeps 24 of the tiny CLIP's 64 (99.90% of the demo's training-set variance).
Uniform buckets per component (see models/pca_quantizer.py): 1024 in the paper, 256 here.
"""
import ml_collections

VARIANTS = ("tiny", "paper")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.kind = "ar"
    config.seed = 0
    config.compute_dtype = "float32"

    config.model = ml_collections.ConfigDict(dict(
        embed_dim=None,
        text_encoding_dim=None,
        max_text_len=None,
        num_components=24,
        num_buckets=256,
        num_dot_buckets=32,
        width=256,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        dropout=0.0,
        embed_scale=None,  # sqrt(embed_dim)
    ))
    config.model.dtype = config.get_ref("compute_dtype")
    config.quantizer = ml_collections.ConfigDict(dict(
        max_rows=200_000,  # training rows the PCA and bucket ranges are fitted on (the first ones)
    ))
    config.text_drop_prob = 0.1  # paper: the text conditioning is dropped 10% of the time
    config.sampling = ml_collections.ConfigDict(dict(
        temperature=1.0,
        top_p=1.0,
        guidance_scale=2.0,
        num_candidates=1,
    ))

    config.data = ml_collections.ConfigDict(dict(
        train_dir="",  # "" = <workdir>/../embeddings/train
        eval_dirs=ml_collections.ConfigDict(dict(test="", test_unseen="")),  # "" = <train_dir>/../<name>
        use_text_encodings=None,
        text_len=None,
        worker_count=0,
    ))
    config.eval = ml_collections.ConfigDict(dict(num_examples=256, batch_size=256, seed=0))

    config.total_steps = 20_000
    config.batch_size = 256
    config.log_every = 100
    config.eval_every = 2_000
    config.checkpoint_every = 2_000
    config.keep_checkpoints = 3
    config.progress_bar = True
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_fsdp_size=2**18))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-4,
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

    if variant == "paper":
        # Table 3: the AR prior has 1B parameters, as the diffusion prior: 24 layers at width 2048
        # with a 3x MLP are 1.01B (a 4x MLP would be 1.21B).
        config.model.update(embed_dim=1024, text_encoding_dim=1024, max_text_len=77, num_components=319,
                            num_buckets=1024, num_dot_buckets=64, width=2048, depth=24, num_heads=32,
                            mlp_ratio=3.0)
        config.total_steps = 1_000_000
        config.batch_size = 4096
        config.optimizer.update(learning_rate=1.6e-4, warmup_steps=10_000)
        config.mesh.fsdp = 8
    return config
