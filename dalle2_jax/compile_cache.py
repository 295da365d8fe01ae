"""JAX's persistent compilation cache for the sampling entry points (CLI, web UI, notebook).

Without it every `dalle2-jax generate` compiles the same stage programs again before its
first image; with it a second run with the same model and shapes loads them from disk.
`enable()` must run before the first program compiles: JAX decides once per process whether
the cache is in use.

The directory: `enable(cache_dir)`, else $DALLE2_JAX_CACHE_DIR, else
$XDG_CACHE_HOME/dalle2-jax/xla (~/.cache/dalle2-jax/xla). DALLE2_JAX_CACHE_DIR=off (or 0,
none, false, empty) turns the cache off, as `--no-cache` does on the command line.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "DALLE2_JAX_CACHE_DIR"
OFF_VALUES = ("", "0", "off", "none", "false", "no")


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The cache directory the environment asks for; None when $DALLE2_JAX_CACHE_DIR turns it off."""
    value = environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES else Path(value).expanduser()
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dalle2-jax" / "xla"


def enable(cache_dir=None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Turn the persistent cache on in `cache_dir` (default: `default_cache_dir()`), creating it.

    Returns the directory, or None when the environment turns the cache off. Every program is
    cached however fast it compiled or small it is: on CPU most compile in under the default
    1 s threshold, and together they are what a run waits for.
    """
    directory = default_cache_dir(environ) if cache_dir is None else Path(os.fspath(cache_dir)).expanduser()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cache_dir: cannot create the compilation cache directory {str(directory)!r} "
                         f"({error.strerror or error})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cache_dir: expected a writable directory, got {str(directory)!r}")

    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold
    compilation_cache.reset_cache()  # forget a "not in use" decided before the directory was set
    return directory


def cache_from_args(cache_dir, no_cache: bool) -> Path | None:
    """The CLI's `--cache-dir DIR` / `--no-cache`: enable the cache unless told not to."""
    if no_cache:
        if cache_dir is not None:
            raise ValueError("--no-cache: expected without --cache-dir")
        return None
    return enable(cache_dir)
