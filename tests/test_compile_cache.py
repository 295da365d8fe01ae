"""The persistent compilation cache of the sampling commands (dalle2_jax/compile_cache.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from dalle2_jax import cli, compile_cache
from test_pipeline import OUT, tiny_pipeline

REPO = Path(__file__).resolve().parents[1]

# `dalle2-jax generate` in a fresh process, counting what JAX's compilation cache reports.
COUNTING_CLI = """
import json, sys, time
from jax import monitoring
counts = {"compiles": 0, "hits": 0, "writes": 0}
names = {"/jax/compilation_cache/compile_requests_use_cache": "compiles",
         "/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}
monitoring.register_event_listener(lambda event, **_: names.get(event) and counts.__setitem__(
    names[event], counts[names[event]] + 1))
started = time.perf_counter()
from dalle2_jax import cli
cli.main(sys.argv[1:])
counts["seconds"] = time.perf_counter() - started
print("COUNTS", json.dumps(counts))
"""


def test_cache_directory_from_the_environment(tmp_path):
    home = os.path.expanduser("~")
    assert compile_cache.default_cache_dir({}) == Path(home) / ".cache" / "dalle2-jax" / "xla"
    assert compile_cache.default_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/dalle2-jax/xla")
    assert compile_cache.default_cache_dir({"DALLE2_JAX_CACHE_DIR": "~/x", "XDG_CACHE_HOME": "/c"}) == Path(home, "x")
    for off in ("off", "0", "", "None", "false"):
        assert compile_cache.default_cache_dir({"DALLE2_JAX_CACHE_DIR": off}) is None
        assert compile_cache.enable(environ={"DALLE2_JAX_CACHE_DIR": off}) is None
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cache_dir"):
        compile_cache.enable(tmp_path / "file" / "xla")
    # --no-cache leaves JAX's configuration alone (this process compiles without a cache).
    assert compile_cache.cache_from_args(None, True) is None
    assert jax.config.jax_compilation_cache_dir is None
    with pytest.raises(SystemExit):
        cli.main(["generate", "a red circle", "--model", "m", "--out", "o.png", "--no-cache", "--cache-dir", "d"])


def test_a_second_generate_loads_every_program_from_the_cache(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    cache = tmp_path / "xla"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "DALLE2_JAX_CACHE_DIR": "off"}

    def generate(name: str, *cache_args: str) -> dict:
        out = tmp_path / f"{name}.png"
        result = subprocess.run(
            [sys.executable, "-c", COUNTING_CLI, "generate", "a red circle", "a blue square", "--model",
             str(tmp_path / "model"), "--out", str(out), "--seed", "4", *cache_args],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        counts = json.loads(result.stdout.split("COUNTS", 1)[1])
        counts["grid"] = np.asarray(Image.open(out))
        return counts

    cold = generate("cold", "--cache-dir", str(cache))
    entries = sorted(p.name for p in cache.iterdir())
    assert cold["compiles"] >= 5 and cold["hits"] == 0 and cold["writes"] == cold["compiles"], cold
    assert len(entries) >= cold["writes"]  # one file per program (JAX may add an -atime file beside each)
    warm = generate("warm", "--cache-dir", str(cache))
    assert warm["compiles"] == cold["compiles"] and warm["hits"] == cold["compiles"] and warm["writes"] == 0, warm
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert cold["grid"].shape == (2 * OUT, OUT, 3)
    np.testing.assert_array_equal(warm["grid"], cold["grid"])  # cached programs compute the same images
    print(f"generate, tiny pipeline: cold {cold['seconds']:.1f} s ({cold['compiles']} programs compiled), "
          f"warm {warm['seconds']:.1f} s (all loaded)")
