"""The XLA:CPU flags dalle2_jax adds on import (dalle2_jax/xla_flags.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from dalle2_jax import xla_flags

FLAG = "xla_cpu_experimental_ynn_fusion_type"
DEFAULT = "individual_dot,reduce"

CHILD = """
import os, sys
import dalle2_jax
import jax, jax.numpy as jnp, numpy as np
from dalle2_jax.models.unet import _conv_same
x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
k = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1
loss = lambda x, k: jnp.sum(jnp.tanh(_conv_same(x, k)) ** 2)
value, (gx, gk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, k)
# GroupNorm-like statistics: sums over the spatial axes and within groups of 8 channels
groups = jax.jit(lambda x: jnp.sum(x.reshape(2, 16, 16, 4, 8), axis=(1, 2, 4)))(x)
channels = jax.jit(lambda x: jnp.sum(x * x, axis=(0, 1, 2)))(x)
np.savez(sys.argv[1], out=np.asarray(_conv_same(x, k)), gx=np.asarray(gx), gk=np.asarray(gk),
         groups=np.asarray(groups), channels=np.asarray(channels))
print(os.environ["XLA_FLAGS"])
"""


def test_defaults_are_appended_and_a_users_setting_wins():
    assert xla_flags.with_cpu_defaults("") == f"--{FLAG}={DEFAULT}"
    other = "--xla_force_host_platform_device_count=8"
    assert xla_flags.with_cpu_defaults(other) == f"{other} --{FLAG}={DEFAULT}"
    mine = f"{other} --{FLAG}="
    assert xla_flags.with_cpu_defaults(mine) == mine
    assert xla_flags.with_cpu_defaults(f"{FLAG}=dot") == f"{FLAG}=dot"
    environ = {"XLA_FLAGS": other}
    xla_flags.apply(environ)
    assert environ["XLA_FLAGS"] == f"{other} --{FLAG}={DEFAULT}"
    with pytest.raises(ValueError, match="flags"):
        xla_flags.with_cpu_defaults(None)


def test_this_process_runs_with_the_defaults():
    assert f"--{FLAG}=" in os.environ["XLA_FLAGS"]


def _child(tmp_path, name, flags):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    out = tmp_path / f"{name}.npz"
    done = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1], np.load(out)


def test_xla_accepts_the_flag_and_results_agree_with_other_backends(tmp_path):
    """Convolutions (ours: XLA's) against YNNPACK's, reductions (ours: YNNPACK's) against XLA's.

    A flag XLA does not know aborts the process, so this also pins the jaxlib range.
    """
    flags, ours = _child(tmp_path, "ours", "")
    assert flags == f"--{FLAG}={DEFAULT}"
    ynn_flags, ynn = _child(tmp_path, "ynn", f"--{FLAG}=individual_convolution,individual_dot")
    assert ynn_flags == f"--{FLAG}=individual_convolution,individual_dot"
    for name in ("out", "gx", "gk"):
        np.testing.assert_allclose(ours[name], ynn[name], rtol=1e-4, atol=1e-4 * np.abs(ynn[name]).max())
    _, xla = _child(tmp_path, "xla", f"--{FLAG}=individual_dot")
    for name in ("groups", "channels"):
        assert np.abs(xla[name]).max() > 1.0
        np.testing.assert_allclose(ours[name], xla[name], rtol=1e-5, atol=1e-5 * np.abs(xla[name]).max())
