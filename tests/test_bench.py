"""`python -m dalle2_jax.bench`: argument parsing, a tiny run of each UNet mode and of prior-train, the reference's error."""
import math
import sys

import pytest

from dalle2_jax import bench
from dalle2_jax.bench import common, reference

TINY = ["--config", "configs/unet.py:decoder_tiny", "--config.model.channel_mult=(1,)",
        "--config.model.attention_resolutions=(32,)", "--config.model.model_channels=8", "--config.model.head_dim=8", "--warmup", "0",
        "--repeats", "1", "--batch", "2"]


def test_parse_args_collects_overrides_and_reference():
    args = bench.parse_args(["unet-train", "--reference", "--config.model.remat=block"])
    assert args.reference and args.overrides == ["--config.model.remat=block"]
    assert args.config == "configs/unet.py:bench"
    assert not bench.parse_args(["prior-train"]).reference
    with pytest.raises(SystemExit):
        bench.parse_args(["unet-train", "--bogus"])
    with pytest.raises(SystemExit):
        bench.parse_args(["unet-train", "--repeats", "0"])


def test_reference_without_diffusers_names_the_option(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as if it were not installed
    with pytest.raises(ValueError, match="--reference: needs torch and diffusers"):
        reference._import_torch_diffusers()


def test_unet_train_reports_step_time_flops_and_ratios():
    result = bench.run(["unet-train", *TINY])
    assert result["mode"] == "unet-train" and result["batch"] == 2
    assert result["step_s"] > 0 and result["flops_per_step"] > 0 and result["compile_s"] > 0
    assert result["gflops_per_s"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 1e9, rel=1e-2)
    assert result["speedup_vs_recorded_diffusers"] == pytest.approx(8.05 / result["step_s"], rel=1e-2)
    assert "speedup_vs_diffusers" not in result  # only with --reference, from a measurement
    assert result["matmul_dtype"] == "float32"
    assert result["peak_tflops"] is None and result["ratio_to_peak"] is None  # no bf16 peak for a CPU


def test_unet_train_ratio_to_peak_with_a_given_peak():
    result = bench.run(["unet-train", *TINY, "--peak-tflops", "0.5"])
    assert result["peak_tflops"] == 0.5
    assert result["ratio_to_peak"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 0.5e12, abs=1e-3)
    with pytest.raises(ValueError, match="--peak-tflops: expected a positive"):
        bench.run(["unet-train", *TINY, "--peak-tflops", "0"])


@pytest.mark.parametrize("platform,kind,peak", [
    ("gpu", "NVIDIA H100 80GB HBM3", 989.0), ("gpu", "NVIDIA H100 PCIe", 756.0), ("gpu", "NVIDIA H200", 989.0),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312.0), ("gpu", "NVIDIA L40S", 362.0), ("gpu", "NVIDIA L4", 121.0),
    ("tpu", "TPU v4", 275.0), ("tpu", "TPU v5 lite", 197.0), ("tpu", "TPU v5p", 459.0), ("tpu", "TPU v6 lite", 918.0),
    ("gpu", "NVIDIA GeForce GTX 1080", None), ("cpu", "cpu", None),
])
def test_peak_tflops_lookup_by_device_kind(platform, kind, peak):
    assert common.peak_tflops(platform, kind) == peak


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prior_train_reports_step_time_flops_and_the_matmul_in_its_dtype(dtype):
    result = bench.run(["prior-train", "--config", "configs/prior.py:tiny", "--batch", "4", "--warmup", "0",
                        "--repeats", "1", f"--config.compute_dtype={dtype}"])
    assert result["mode"] == "prior-train" and result["batch"] == 4 and result["dtype"] == dtype
    assert result["matmul_dtype"] == dtype
    assert result["flops_per_step"] > 0 and result["step_s"] > 0 and math.isfinite(result["loss"])
    assert result["gflops_per_s"] == pytest.approx(result["flops_per_step"] / result["step_s"] / 1e9, rel=1e-2)
    assert result["ratio_to_matmul"] == pytest.approx(
        result["gflops_per_s"] / result["matmul_gflops_per_s"], rel=1e-2, abs=1e-3)
    assert result["speedup_vs_dalle2_pytorch"] == pytest.approx(44.3 / result["step_s"], rel=1e-2)


def test_unet_sample_reports_guided_and_unguided_loops():
    result = bench.run(["unet-sample", *TINY, "--steps", "3", "--guidance", "2.0"])
    assert result["finite"] and result["steps"] == 3 and result["forward_batch"] == 4
    assert result["sample_s"] > 0 and result["unguided_sample_s"] > 0
    assert result["guided_over_unguided"] == pytest.approx(result["sample_s"] / result["unguided_sample_s"], rel=1e-2)
