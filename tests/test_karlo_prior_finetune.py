"""Fine-tuning an imported prior: `--config.init_from=DIR` (a diffusers UnCLIP directory) starts the
prior's training from its converted weights; a run stopped at a checkpoint resumes bit for bit."""
import numpy as np
import pytest


import jax  # noqa: E402

import karlo_fixture  # noqa: E402
from dalle2_jax import config_util  # noqa: E402
from dalle2_jax.convert import unclip as unclip_import  # noqa: E402
from dalle2_jax.convert.karlo_prior import prior_config_from_diffusers  # noqa: E402
from dalle2_jax.data import embeddings  # noqa: E402
from dalle2_jax.tasks import prior as prior_task  # noqa: E402
from dalle2_jax.training import loop  # noqa: E402

PAIRS = 16


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    reference = karlo_fixture.Reference(variations=False, seed=60)
    root = reference.write(tmp_path_factory.mktemp("karlo") / "karlo-tiny")
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, PAIRS)
    data = dict(image_embeds=(3 * rng.standard_normal((PAIRS, karlo_fixture.EMBED))).astype(np.float32),
                text_embeds=(3 * rng.standard_normal((PAIRS, karlo_fixture.EMBED))).astype(np.float32),
                text_encodings=rng.standard_normal((PAIRS, karlo_fixture.CONTEXT_LEN,
                                                    karlo_fixture.EMBED)).astype(np.float16),
                text_mask=np.arange(karlo_fixture.CONTEXT_LEN)[None] < lengths[:, None])
    train_dir = embeddings.write_embedding_dataset(str(tmp_path_factory.mktemp("emb") / "train"), **data)
    return reference, root, train_dir


def _config(reference, root, train_dir, total_steps):
    config = config_util.load_config("configs/prior.py:karlo", [])
    tiny = prior_config_from_diffusers(dict(reference.prior.config))
    config.model.update({k: v for k, v in tiny.model.to_dict().items() if k != "dtype"})
    config.data.update(train_dir=train_dir, eval_dirs={})
    config.update(dict(init_from=str(root), batch_size=8, total_steps=total_steps, log_every=1, eval_every=0,
                       checkpoint_every=2, progress_bar=False))
    config.optimizer.update(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0, schedule="constant")  # the same
    # learning rates whatever total_steps is, so the 2-step run and its resumption equal the 4-step one
    config.ema.update(decay=1.0, warmup=False)  # the EMA copy stays at the imported weights
    return config


def _host(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.heavy
def test_prior_fine_tunes_from_the_imported_weights_and_resumes(karlo, tmp_path):
    reference, root, train_dir = karlo
    imported = next(s for s in unclip_import.read_unclip_dir(root)[0] if s.name == "prior").variables["params"]

    config = _config(reference, root, train_dir, total_steps=4)
    whole = loop.train(prior_task.make_task(config, workdir=str(tmp_path / "a")), config, str(tmp_path / "a"))
    for got, want in zip(_host(whole.ema_params), _host(imported), strict=True):
        np.testing.assert_array_equal(got, want)  # EMA decay 1: exactly the converted Karlo prior
    moved = max(float(np.abs(a - b).max()) for a, b in zip(_host(whole.params), _host(imported)))
    assert moved > 1e-4  # and the params were trained from there

    halves = tmp_path / "b"
    loop.train(prior_task.make_task(_config(reference, root, train_dir, 2), workdir=str(halves)),
               _config(reference, root, train_dir, 2), str(halves))
    resumed = loop.train(prior_task.make_task(config, workdir=str(halves)), config, str(halves))
    for got, want in zip(_host(resumed.params), _host(whole.params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_karlo_prior_without_init_from_is_refused(karlo, tmp_path):
    reference, root, train_dir = karlo
    config = _config(reference, root, train_dir, 2)
    config.init_from = ""
    with pytest.raises(ValueError, match="config.init_from: a prior without learned null text"):
        prior_task.make_task(config, workdir=str(tmp_path))
    config.init_from = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.init_from: no directory"):
        prior_task.make_task(config, workdir=str(tmp_path))
