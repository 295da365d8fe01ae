"""The autoregressive prior's vocabulary: CLIP image embeddings as PCA-component tokens.

  quantizer = PCAQuantizer.fit(image_embeds, text_embeds, num_components=319, num_buckets=1024,
                               num_dot_buckets=64)
  tokens = quantizer.quantize(image_embeds)          # (N, K) int32, component k's bucket
  approx = quantizer.dequantize(tokens)              # (N, D) unit embeddings
  dot = quantizer.dot_tokens(image_embeds, text_embeds)   # (N,) the z_i . z_t token

Unit-normalised z_i are reduced to their leading K principal components (Ramesh et al.
2022, section 2.2), fitted in float64 NumPy, ordered by decreasing eigenvalue.

Each component is cut into `num_buckets` buckets of equal width over the range the training
set covers (its min to max). Uniform rather than quantile edges: every training value then
comes back within half a bucket width, bucket k's neighbours are the next values up and down
(an ordered vocabulary), and the edges stay distinct however few rows there are (1024
quantiles of a small set repeat; quantile buckets in the tails are as wide as the tails).

The dot product z_i . z_t gets quantile edges instead: equal-mass buckets make "the top half
of its training distribution", which sampling draws from, exactly the upper half of the tokens.

The fitted arrays travel with the model as its "quantizer" variable collection
(`as_variables`); `decode_tokens` is the same dequantization in JAX for the sampler.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile

import jax.numpy as jnp
import numpy as np

FILE_NAME = "pca_quantizer.npz"
_ARRAYS = ("mean", "components", "eigenvalues", "low", "high", "dot_edges")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class PCAQuantizer:
    """mean (D,), components (K, D) orthonormal rows by decreasing eigenvalue, eigenvalues (D,)
    of the whole covariance, per-component bucket range low/high (K,), dot_edges (M + 1,)."""

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    low: np.ndarray
    high: np.ndarray
    dot_edges: np.ndarray
    num_buckets: int

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def num_dot_buckets(self) -> int:
        return int(self.dot_edges.shape[0] - 1)

    @property
    def bucket_width(self) -> np.ndarray:
        return (self.high - self.low) / self.num_buckets

    @property
    def explained_variance(self) -> float:
        """The fraction of the training embeddings' variance the K components keep."""
        return float(np.sum(self.eigenvalues[:self.num_components]) / np.sum(self.eigenvalues))

    @classmethod
    def fit(cls, image_embeds, text_embeds, *, num_components: int, num_buckets: int,
            num_dot_buckets: int) -> "PCAQuantizer":
        image = _unit(image_embeds)
        if image.ndim != 2 or image.shape[0] < 2:
            raise ValueError(f"image_embeds: expected (N, D) with N >= 2, got shape {np.shape(image_embeds)}")
        if np.shape(text_embeds) != image.shape:
            raise ValueError(f"text_embeds: expected the shape of image_embeds {image.shape}, "
                             f"got {np.shape(text_embeds)}")
        for name, value, top in (("num_components", num_components, image.shape[1]),
                                 ("num_buckets", num_buckets, None), ("num_dot_buckets", num_dot_buckets, None)):
            low = 2 if top is None else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
                    or (top is not None and value > top):
                bound = f"in [1, {top}] (the embedding size)" if top else ">= 2"
                raise ValueError(f"{name}: expected an int {bound}, got {value!r}")
        mean = image.mean(axis=0)
        eigenvalues, vectors = np.linalg.eigh(np.cov(image - mean, rowvar=False))
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, vectors = np.maximum(eigenvalues[order], 0.0), vectors[:, order]
        components = vectors[:, :num_components].T
        # A sign per component (largest entry positive), so refits of the same data agree.
        components *= np.sign(components[np.arange(num_components), np.argmax(np.abs(components), axis=1)])[:, None]
        coefficients = (image - mean) @ components.T
        low, high = coefficients.min(axis=0), coefficients.max(axis=0)
        high = np.maximum(high, low + 1e-6)  # a constant component still gets buckets of positive width
        dots = np.sum(image * _unit(text_embeds), axis=-1)
        dot_edges = np.quantile(dots, np.linspace(0.0, 1.0, num_dot_buckets + 1))
        return cls(mean, components, eigenvalues, low, high, dot_edges, int(num_buckets))

    def project(self, image_embeds) -> np.ndarray:
        """PCA coefficients (N, K) of unit-normalised embeddings."""
        return (_unit(image_embeds) - self.mean) @ self.components.T

    def reconstruct(self, coefficients) -> np.ndarray:
        """Unit embeddings (N, D) from PCA coefficients (N, K)."""
        return _unit(self.mean + np.asarray(coefficients, np.float64) @ self.components)

    def quantize(self, image_embeds) -> np.ndarray:
        """Bucket tokens (N, K) int32; values outside the fitted range go to the end buckets."""
        position = (self.project(image_embeds) - self.low) / self.bucket_width
        return np.clip(np.floor(position), 0, self.num_buckets - 1).astype(np.int32)

    def bucket_centres(self, tokens) -> np.ndarray:
        return self.low + (np.asarray(tokens, np.float64) + 0.5) * self.bucket_width

    def dequantize(self, tokens) -> np.ndarray:
        return self.reconstruct(self.bucket_centres(tokens))

    def dot_tokens(self, image_embeds, text_embeds) -> np.ndarray:
        """The quantile bucket (N,) int32 of z_i . z_t (unit vectors)."""
        dots = np.sum(_unit(image_embeds) * _unit(text_embeds), axis=-1)
        return np.clip(np.searchsorted(self.dot_edges[1:-1], dots, side="right"), 0,
                       self.num_dot_buckets - 1).astype(np.int32)

    def as_variables(self) -> dict[str, np.ndarray]:
        """The arrays the sampler needs, float32, as the model's "quantizer" collection."""
        return {name: np.asarray(getattr(self, name), np.float32) for name in ("mean", "components", "low", "high")}

    # -- the file in a training workdir ---------------------------------------------------------

    def save(self, path) -> None:
        """Write `path` (.npz) atomically."""
        from dalle2_jax.training.metrics import atomic_write

        arrays = {name: np.asarray(getattr(self, name)) for name in _ARRAYS}
        arrays["num_buckets"] = np.asarray(self.num_buckets)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path, argument: str = "path") -> "PCAQuantizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{argument}: no PCA quantizer file at {path!r}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: np.asarray(data[name], np.float64) for name in _ARRAYS}
                num_buckets = int(data["num_buckets"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            raise ValueError(f"{argument}: the PCA quantizer {path} is corrupt ({type(error).__name__}: {error})"
                             ) from None
        quantizer = cls(**arrays, num_buckets=num_buckets)
        k, d = quantizer.components.shape
        if (quantizer.mean.shape != (d,) or quantizer.low.shape != (k,) or quantizer.high.shape != (k,)
                or quantizer.eigenvalues.shape != (d,) or quantizer.dot_edges.ndim != 1):
            raise ValueError(f"{argument}: the PCA quantizer {path} is corrupt (inconsistent array shapes)")
        return quantizer


def variable_shapes(embed_dim: int, num_components: int) -> dict[str, tuple[int, ...]]:
    """The shapes of the "quantizer" collection (`PCAQuantizer.as_variables`)."""
    return {"mean": (embed_dim,), "components": (num_components, embed_dim),
            "low": (num_components,), "high": (num_components,)}


def decode_tokens(quantizer_variables, tokens: jnp.ndarray, num_buckets: int) -> jnp.ndarray:
    """`PCAQuantizer.dequantize` in JAX: unit embeddings (..., D) from tokens (..., K)."""
    low, high = quantizer_variables["low"], quantizer_variables["high"]
    coefficients = low + (tokens.astype(jnp.float32) + 0.5) * ((high - low) / num_buckets)
    embeds = quantizer_variables["mean"] + coefficients @ quantizer_variables["components"]
    return embeds * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(embeds, axis=-1, keepdims=True), 1e-12))
