"""dalle2-jax: DALL-E 2 (unCLIP) in JAX/Flax."""

__version__ = "0.1.0"

from dalle2_jax import xla_flags as _xla_flags

_xla_flags.apply()  # before any JAX backend starts: see dalle2_jax/xla_flags.py


def __getattr__(name):
    # The pipeline pulls in every model; import it only when asked for.
    if name == "UnCLIPPipeline":
        from dalle2_jax.pipeline import UnCLIPPipeline

        return UnCLIPPipeline
    raise AttributeError(f"module 'dalle2_jax' has no attribute {name!r}")
