"""`dreamd doctor` on a machine with an NVIDIA GPU torch cannot use (PyPI's CPU-only
torch on Windows): the GPU found through pynvml or a real `nvidia-smi` process (a
script on PATH printing what the real one prints), and the advice: PyTorch's command
for its CUDA build, for the driver's CUDA and this environment's python."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from dreamd import config, cuda_check, doctor
from dreamd.cuda_check import Gpus, TorchBuild
from tests.conftest import dreamd_cmd

RTX = Gpus(["NVIDIA GeForce RTX 3080"], (12, 8))
CPU_ONLY = TorchBuild("2.5.1+cpu", None, False)
NVIDIA_SMI = """#!/bin/sh
if [ "$1" = "-L" ]; then
  echo "GPU 0: NVIDIA GeForce RTX 3080 (UUID: GPU-5c1d0d4e-7a2b-4f4e-9a51-3b1f3c2d0e11)"
  echo "GPU 1: NVIDIA RTX A4000 (UUID: GPU-0b6c2a53-1111-2222-3333-444455556666)"
  exit 0
fi
cat <<'TABLE'
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 560.94                 Driver Version: 560.94         CUDA Version: 12.6     |
|-----------------------------------------+------------------------+----------------------+
TABLE
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """A driver-less machine (pynvml cannot start) with `nvidia-smi` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(NVIDIA_SMI)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    def no_library():
        raise OSError("NVML Shared Library Not Found")
    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_library))
    return bin_dir


def torch_row(monkeypatch, gpus, build) -> tuple[str, str]:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: build.available)
    monkeypatch.setattr(cuda_check, "nvidia_gpus", lambda: gpus)
    monkeypatch.setattr(cuda_check, "torch_build", lambda: build)
    return doctor._torch(config.parse(""))


def test_a_cpu_only_torch_beside_an_nvidia_gpu_is_a_warning_with_the_cuda_install(
        monkeypatch):
    verdict, detail = torch_row(monkeypatch, RTX, CPU_ONLY)
    assert verdict == "warning"
    assert "NVIDIA GeForce RTX 3080" in detail and "CPU-only build" in detail
    assert (f"{sys.executable} -m pip install --force-reinstall torch torchvision "
            f"--index-url https://download.pytorch.org/whl/cu128") in detail
    assert cuda_check.SELECTOR in detail


def test_no_nvidia_gpu_no_advice(monkeypatch):
    verdict, detail = torch_row(monkeypatch, None, CPU_ONLY)
    assert verdict == "ok" and "NVIDIA" not in detail and "pip" not in detail


def test_a_cuda_build_the_driver_is_too_old_for_says_update_the_driver(monkeypatch):
    verdict, detail = torch_row(monkeypatch, Gpus(["NVIDIA GeForce GTX 1080"], (12, 2)),
                                TorchBuild("2.9.1+cu130", "13.0", False))
    assert verdict == "warning"
    assert "older than the CUDA 13.0 this torch needs (update the NVIDIA driver)" in detail
    assert detail.endswith("--index-url https://download.pytorch.org/whl/cu121")


def test_a_cuda_build_that_does_not_load_on_a_new_enough_driver(monkeypatch):
    _, detail = torch_row(monkeypatch, RTX, TorchBuild("2.7.0+cu126", "12.6", False))
    assert "its CUDA libraries did not load" in detail and "update" not in detail


@pytest.mark.parametrize("driver,tag", [((12, 8), "cu128"), ((12, 7), "cu126"),
                                        ((13, 2), "cu130"), ((11, 4), "cu118"),
                                        (None, "cu130")])
def test_the_suggested_build_is_the_newest_the_driver_runs(driver, tag):
    command = cuda_check.install_command(driver, python=r"C:\Program Files\dreamd\python.exe")
    assert command == (r'"C:\Program Files\dreamd\python.exe" -m pip install '
                       r"--force-reinstall torch torchvision --index-url "
                       f"https://download.pytorch.org/whl/{tag}")


def test_the_gpus_are_read_from_nvidia_smi_without_nvml(fake_nvidia_smi):
    assert cuda_check.nvidia_gpus() == Gpus(["NVIDIA GeForce RTX 3080", "NVIDIA RTX A4000"],
                                            (12, 6))


def test_no_driver_and_no_nvidia_smi_is_no_gpu(fake_nvidia_smi):
    (fake_nvidia_smi / "nvidia-smi").unlink()
    assert cuda_check.nvidia_gpus() is None


def test_a_failing_nvidia_smi_is_no_gpu(fake_nvidia_smi):
    (fake_nvidia_smi / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed "
                                                "because it couldn't communicate with the "
                                                "NVIDIA driver.'\nexit 9\n")
    assert cuda_check.nvidia_gpus() is None


@pytest.mark.slow
def test_dreamd_doctor_names_the_gpu_and_the_fix(dreamd_env, tmp_path):
    """The whole command on this machine (no driver, so pynvml fails and the fake
    nvidia-smi answers), whatever torch build is installed here: a torch that cannot
    reach the GPU is one warning with a pip command in it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**dreamd_env, "PATH": f"{bin_dir}:{dreamd_env['PATH']}"}
    out = subprocess.run(dreamd_cmd("doctor", "--json"), env=env, capture_output=True,
                         text=True, timeout=300)
    rows = {r["check"]: r for r in json.loads(out.stdout)}
    import torch
    if torch.cuda.is_available():
        pytest.skip("torch reaches a real GPU here")
    assert rows["torch"]["verdict"] == "warning"
    assert "NVIDIA GeForce RTX 3080, NVIDIA RTX A4000" in rows["torch"]["detail"]
    assert "--index-url https://download.pytorch.org/whl/cu126" in rows["torch"]["detail"]
