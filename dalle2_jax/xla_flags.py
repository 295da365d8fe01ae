"""XLA:CPU settings the project adds to XLA_FLAGS before JAX starts its backends.

XLA reads XLA_FLAGS once, when the first computation creates the backend, so
`dalle2_jax` applies these on import: a process that has already run JAX code
before importing `dalle2_jax` keeps its own settings. A flag already named in
XLA_FLAGS is left as the user set it.

xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce: jaxlib 0.10 hands
convolutions to YNNPACK by default, which runs this project's 32-128-channel
convolutions at about half the speed of XLA's own (Eigen) kernels on 2 AVX-512
cores (3x3, 64 channels at 64px, forward + backward: 88 -> 147 GFLOP/s; the tiny
decoder's training step 0.68 -> 0.54 s; `bench unet-train` 12.0 -> 9.7 s), while
its matrix multiplications are as fast as XLA's and the transformers' (CLIP,
prior) steps are faster with them, so dots stay on YNNPACK. Reductions go to
YNNPACK too: XLA splits large ones (GroupNorm statistics, bias gradients,
softmax sums) into reduce-window trees that read memory at under 1 GB/s, e.g.
38 ms to sum (8, 64, 64, 192) over all but the channels. With them on YNNPACK
the training steps went: `bench unet-train` 5.4 -> 4.5 s (blocked attention), the
earlier 32-64-128-channel tiny decoder 0.47 -> 0.35 s, tiny upsampler 1.57 -> 1.22 s; CLIP (0.099 s) and the prior
(0.28 s) the same.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "individual_dot,reduce"}


def with_cpu_defaults(flags: str) -> str:
    """`flags` (an XLA_FLAGS string) with each of CPU_DEFAULTS appended unless already named."""
    if not isinstance(flags, str):
        raise ValueError(f"flags: expected an XLA_FLAGS string, got {type(flags).__name__}")
    named = {part.lstrip("-").split("=", 1)[0] for part in flags.split()}
    extra = [f"--{name}={value}" for name, value in CPU_DEFAULTS.items() if name not in named]
    return " ".join([flags.strip(), *extra]).strip()


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets environ["XLA_FLAGS"] to `with_cpu_defaults` of its current value."""
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))
