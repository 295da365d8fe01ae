"""Classifier-free guidance (Ho & Salimans, 2021) as a denoiser transform."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp


def _batch_both(cond_leaf, uncond_leaf, path):
    cond_leaf, uncond_leaf = jnp.asarray(cond_leaf), jnp.asarray(uncond_leaf)
    if cond_leaf.ndim == 0:
        raise ValueError(f"cond{jax.tree_util.keystr(path)}: expected a batched array, got a scalar")
    try:
        uncond_leaf = jnp.broadcast_to(uncond_leaf, cond_leaf.shape).astype(cond_leaf.dtype)
    except ValueError:
        raise ValueError(
            f"uncond{jax.tree_util.keystr(path)}: expected a shape that broadcasts to {cond_leaf.shape}, "
            f"got {uncond_leaf.shape}"
        ) from None
    return jnp.concatenate([cond_leaf, uncond_leaf], axis=0)


def classifier_free_guidance(
    denoiser: Callable[..., jax.Array],
    guidance_scale,
    *,
    uncond: Mapping,
    learned_variance: bool = False,
) -> Callable[..., jax.Array]:
    """A denoiser returning u + s (c - u) from ONE call of `denoiser` on the batch [x; x].

    uncond has the structure of the cond the guided denoiser is called with (each leaf
    broadcast to the cond leaf's shape, so a scalar null flag works). With learned_variance
    only the first half of the last axis is guided; the variance half is the conditional one.
    Scale 1 is the conditional output, scale 0 the unconditional one.
    """
    if not isinstance(uncond, Mapping):
        raise ValueError(f"uncond: expected a mapping of denoiser keyword arguments, got {type(uncond).__name__}")

    def guided(x, t, **cond):
        if jax.tree.structure(cond) != jax.tree.structure(dict(uncond)):
            raise ValueError(
                f"uncond: expected the structure of cond {jax.tree.structure(cond)}, "
                f"got {jax.tree.structure(dict(uncond))}"
            )
        both = jax.tree_util.tree_map_with_path(
            lambda path, c, u: _batch_both(c, u, path), cond, dict(uncond)
        )
        out = denoiser(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), **both)
        cond_out, uncond_out = jnp.split(out, 2, axis=0)
        if learned_variance:
            cond_pred, cond_var = jnp.split(cond_out, 2, axis=-1)
            uncond_pred, _ = jnp.split(uncond_out, 2, axis=-1)
            return jnp.concatenate([uncond_pred + guidance_scale * (cond_pred - uncond_pred), cond_var], axis=-1)
        return uncond_out + guidance_scale * (cond_out - uncond_out)

    return guided
