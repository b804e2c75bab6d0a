"""`pliant bench gpu-step` (bench/gpu_check.py), the training-step half of scripts/gpu-check.sh:
its GPU busy time counts overlapping kernels once; on CPU it measures the same steps (aten ops
per pass, no GPU fields), so its path runs without a GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO


def test_busy_time_is_the_union_of_kernel_intervals():
    from torch.autograd import DeviceType

    from pliant.bench.gpu_check import kernel_stats

    def kernel(start, end):
        return SimpleNamespace(name="void k()", device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=start, end=end))

    host = [SimpleNamespace(name=n, device_type=DeviceType.CPU, time_range=None)
            for n in ("aten::mm", "cudaLaunchKernel", "aten::add", "cudaLaunchKernel", "cudaLaunchKernel")]
    stats = kernel_stats(host + [kernel(0, 10), kernel(5, 12), kernel(20, 25)], on_cuda=True)
    assert stats == {"kernel_us": 17, "launches": 3, "aten_ops": 2}  # [0, 12] and [20, 25]
    assert kernel_stats(host, on_cuda=False) == {"kernel_us": 0, "launches": 0, "aten_ops": 2}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_step_runs_on_cpu(tmp_path):
    overlay = tmp_path / "cpu.yaml"
    overlay.write_text(yaml.safe_dump({
        "cluster": {"device": "cpu", "backend": "gloo", "device_memory_gib": 4.0},
        "model": {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn_hidden": 128,
                  "vocab_size": 256, "dtype": "fp32"},
        "train": {"batch_tokens": 512, "max_len": 256}, "faults": {"enabled": False}}))
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "-m", "pliant.launch.cli", "bench", "gpu-step", "--config",
                        str(REPO / "configs" / "faults-1gpu.yaml"), "--config", str(overlay), "--out", str(out),
                        "--warmup", "1", "--steps", "2"], capture_output=True, text=True, timeout=280, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(out.read_text())["summary"]
    assert s["gpu_busy_fraction"] is None and s["kernel_launches_per_pass"] is None
    assert s["aten_ops_per_pass"] > 50 and s["step_s_median"] > 0
