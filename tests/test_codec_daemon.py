"""The daemon end to end with a TAESD it found in a (fake) ComfyUI models dir, and
`dreamd doctor` saying which codec it chose and why."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests import invariants
from tests.conftest import FAST_CONFIG, dreamd_cmd
from tests.conftest_codecs import diffusers_tiny, save_taesd_pair


@pytest.mark.slow
def test_daemon_interpolates_with_taesd_found_in_comfyui_models_dir(daemon, tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    save_taesd_pair(models / "vae_approx", diffusers_tiny())
    daemon.config.write_text(FAST_CONFIG + f'\n[comfyui]\nmodels_dir = "{models}"\n')

    doctor = subprocess.run(dreamd_cmd("--config", str(daemon.config), "doctor", "--json"),
                            env=daemon.env, capture_output=True, text=True, timeout=120)
    codec = {r["check"]: r for r in json.loads(doctor.stdout)}["codec"]
    assert codec["verdict"] == "ok" and codec["detail"].startswith("taesd from ")
    assert "vae_approx" in codec["detail"]

    result = daemon.run(10)
    assert result.returncode == 0, result.stdout
    status = json.loads((daemon.data_dir / "output" / "status.json").read_text())
    assert status["codec"] == "taesd" and status["frame_number"] > 0
    facts = invariants.check(daemon.data_dir)
    assert facts["frames"] > 0
    latents = list((daemon.data_dir / "latents").glob("*.safetensors"))
    assert latents, "keyframe latents are stored for reuse"
    engine = daemon.db()
    with engine.connect() as conn:
        from sqlalchemy import text
        codecs = set(conn.execute(text("SELECT codec FROM interpolations "
                                       "WHERE state='completed'")).scalars())
    engine.dispose()
    assert codecs == {"taesd"}
    assert "codec chosen: taesd from" in (daemon.data_dir / "logs" / "dreamd.log").read_text()
