"""Test configuration: 8 simulated CPU devices so sharded code paths run for real.

The environment must be set before JAX is imported anywhere, which is why it
lives at the top of conftest.py rather than in a fixture.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep each pytest-xdist worker to one intra-op thread pool of modest size.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The CLI turns JAX's persistent compilation cache on (~/.cache/dalle2-jax/xla): tests that
# want it name their own directory.
os.environ.setdefault("DALLE2_JAX_CACHE_DIR", "off")

import dalle2_jax  # noqa: E402,F401  (adds the project's XLA:CPU flags before the backend starts)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}, CI={IN_CI}"


PARITY_REFERENCES = ("parity_transformers", "parity_numpy", "parity_diffusers")


def pytest_collection_modifyitems(config, items):
    """`-m parity` selects every parity test; `-m parity_numpy` (etc.) those against one reference."""
    for item in items:
        if any(item.get_closest_marker(name) for name in PARITY_REFERENCES) and not item.get_closest_marker("parity"):
            item.add_marker(pytest.mark.parity)


@pytest.fixture(scope="session")
def scale():
    """Size factor for `heavy` tests: 1.0 locally, smaller in CI (never 0: they always run)."""
    return float(os.environ.get("DALLE2_TEST_SCALE", "0.5" if IN_CI else "1.0"))


@pytest.fixture(scope="session")
def devices8():
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 simulated devices, got {len(devices)}"
    return devices


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, request):
    """A `shapes` build of the sizes in the test module's SHAPES_SIZES, shared by its tests."""
    from dalle2_jax.data import shapes

    directory = str(tmp_path_factory.mktemp("data"))
    shapes.build_shapes(directory, **request.module.SHAPES_SIZES)
    return directory
