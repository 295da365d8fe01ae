"""configs/prior.py:karlo has exactly Karlo's shapes: its parameter count (jax.eval_shape, nothing
allocated) equals diffusers' PriorTransformer built from the same config on torch's meta device."""
import jax
import numpy as np

from dalle2_jax import config_util
from dalle2_jax.convert.karlo_prior import KARLO_PRIOR_CONFIG
from dalle2_jax.pipeline.stages import abstract_variables, build_module

import torch  # the reference; installed by the dev extra
import diffusers  # the reference; installed by the dev extra


def test_karlo_prior_parameter_count_equals_diffusers():
    config = config_util.load_config("configs/prior.py:karlo", [])
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(
        abstract_variables("prior", build_module("prior", config), config)))
    with torch.device("meta"):
        reference = diffusers.PriorTransformer(**{k: v for k, v in KARLO_PRIOR_CONFIG.items()
                                                  if not k.startswith("_")})
    theirs = sum(p.numel() for p in reference.parameters())
    assert ours == theirs, (ours, theirs)
    assert 1.0e9 < ours < 1.1e9  # the ~1B prior of Karlo v1 alpha
    assert (config.model.width, config.model.depth, config.model.num_heads) == (2048, 20, 32)
