"""launch/bench.py runs all its paths on real MNIST files and reports what it measured (no timing asserts);
launch/gpu_check.sh is valid bash (it runs on a GPU host, or small on the CPU with GPU_CHECK_ALLOW_CPU=1)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, environment, ok

from pipeline.report import WARMUP_STEPS


@pytest.mark.slow
def test_bench_measures_every_path(tmp_path, mnist_root):
    out = tmp_path / "bench.json"
    result = ok(
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch" / "bench.py"),
                "--recipe",
                "mnist_mlp",
                "--data-root",
                str(mnist_root),
                "--steps",
                "20",
                "--repeats",
                "1",
                "--json",
                str(out),
            ],
            cwd=tmp_path,
            env={**environment(), "TMPDIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    report = json.loads(out.read_text())
    rates = report["samples_per_s"]
    assert set(rates) == {"pipeline", "pipeline_stream", "bare", "bare_u8", "tutorial"}
    assert all(rate > 0 for rate in rates.values()), rates
    assert abs(report["ratios"]["pipeline/bare"] - rates["pipeline"] / rates["bare"]) < 1e-9
    assert abs(report["ratios"]["pipeline_stream/pipeline"] - rates["pipeline_stream"] / rates["pipeline"]) < 1e-9
    assert report["steps"] == 20 and report["batch_size"] == 64
    # Every path, the pipeline's too, on the one device, after the loop's warm-up.
    assert report["device"] == "cpu" and report["warmup_steps"] == WARMUP_STEPS
    assert f"20 steps/path after {WARMUP_STEPS} warm-up, device cpu" in result.stdout
    for path in rates:
        assert f"\n{path} " in result.stdout  # the printed table has a row per path
    # The pipeline path's shards and runs live in a temporary folder that is gone afterwards.
    assert not list(tmp_path.glob("bench-*"))


def test_bench_names_missing_data(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "--recipe", "mnist_mlp", "--data-root", str(tmp_path)],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "MNIST raw files missing" in result.stderr and "Traceback" not in result.stderr


def test_bench_refuses_a_device_it_cannot_see(tmp_path, mnist_root):
    # --device cuda where torch sees no GPU: said before any work, not a traceback halfway.
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "--data-root", str(mnist_root), "--device", "cuda"],
        cwd=tmp_path,
        env={**environment(), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--device cuda, but torch sees no CUDA device" in result.stderr and result.stdout == ""


def test_gpu_check_script_is_valid_bash():
    ok(subprocess.run(["bash", "-n", str(ROOT / "launch" / "gpu_check.sh")], capture_output=True, text=True))


@pytest.mark.slow
def test_bench_prepare_reports_each_process_count_on_an_image_folder(tmp_path):
    result = ok(
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch" / "bench_prepare.py"),
                "--images",
                "120",
                "--side",
                "16",
                "--processes",
                "1,2",
                "--folder",
                str(tmp_path),
                "--project",
                "2x8",
            ],
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    for processes in (1, 2):
        assert f"{processes} process(es): 120 images in " in result.stdout, result.stdout
    assert "2 vs 1 process(es): " in result.stdout and "projection: 1,281,167 images" in result.stdout
    # Both counts built the same shards (one fingerprint); the second started from an empty cache.
    assert len(list((tmp_path / "cache" / "image_folder").iterdir())) == 1
