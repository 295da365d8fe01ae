"""NumPy float64 references shared by the model tests."""
import numpy as np


def group_norm(x, groups, scale, bias, eps=1e-5):
    """GroupNorm over (B, ..., C): statistics per sample and group of C // groups channels."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * np.asarray(scale) + np.asarray(bias)
