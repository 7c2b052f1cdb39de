"""`dreamd run` with the in-process backend, as a real subprocess on the CPU with a tiny
model of the real architecture (an original-layout single file): it dreams end to end
with latents fed from keyframe to keyframe, survives SIGKILL mid keyframe, gives the
model back while a game runs and loads it again after, and every bad model is one line
while the dream goes on with the procedural backend."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from tests import diffusion_tiny as tiny
from tests import invariants
from tests import model_files as mf
from tests.conftest import FAST_CONFIG, with_keys
from tests.test_daemon import STOP_DEADLINE, run_until, status, stop, wait_in

SDXL_LORA = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight":
             ("F16", [16, 2048]),
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight":
             ("F16", [640, 16])}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model")
    parts = tiny.tiny_parts(seed=11)
    return {"ckpt": tiny.save_ldm(root / "tiny-sd15.safetensors", parts),
            "skeleton": tiny.save_skeleton(root / "skeleton", parts), "root": root}


def diffusion_config(files: dict, **keys) -> str:
    values = {"model": str(files["ckpt"]), "config_dir": str(files["skeleton"]),
              "lora": "none", "steps": 2, **keys}
    text = with_keys(FAST_CONFIG, "generation", 'backend = "diffusers"\ndenoise = 0.5')
    text = with_keys(text, "system", 'log_level = "DEBUG"')
    return text + "[diffusion]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                            for k, v in values.items())


def rows(daemon, sql: str, *params) -> list:
    con = sqlite3.connect(f"file:{daemon.data_dir / 'dreamd.db'}?mode=ro", uri=True,
                          timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def made_by(daemon, backend: str) -> int:
    found = rows(daemon, "SELECT count(*) FROM keyframes WHERE state = 'completed' AND "
                         "backend = ?", backend)
    return found[0][0] if found else 0


def log_text(daemon) -> str:
    path = daemon.data_dir / "logs" / "dreamd.log"
    return path.read_text() if path.exists() else ""


def inputs(text: str) -> list[str]:
    return re.findall(r"keyframe \d+: input ([a-z ,-]+), seed", text)


@pytest.mark.slow
def test_a_daemon_dreams_with_the_model_and_a_kill_mid_keyframe_loses_nothing(daemon, model):
    daemon.config.write_text(diffusion_config(model))
    run_until(daemon, lambda: made_by(daemon, "diffusers") >= 6 and rows(
        daemon, "SELECT count(*) FROM frames WHERE shown_at IS NOT NULL")[0][0] > 0,
        "six keyframes from the model, and frames shown")
    invariants.check(daemon.data_dir)
    first = log_text(daemon)
    fed = inputs(first)
    # the first keyframe after the seed image is encoded; the rest start from the latent
    # of the keyframe before them (or are colour-matched in latent space)
    assert fed and all(f.startswith("latent") for f in fed[2:]), fed
    assert first.count("diffusion model loaded in") == 1
    # the seed each keyframe used is the one the ledger records
    for chain_index, seed in rows(daemon, "SELECT chain_index, seed FROM keyframes "
                                          "WHERE state = 'completed' AND backend = 'diffusers'"):
        assert f"keyframe {chain_index}: input" in first
        assert re.search(rf"keyframe {chain_index}: input [a-z ,-]+, seed {seed},", first)
    st = status(daemon)
    assert (st["backend"], st["problem"]) == ("diffusers", None)

    # SIGKILL while the model denoises a keyframe, then start again
    marker = daemon.data_dir / "paused-at-keyframe-denoising"
    proc = daemon.start(extra_env={"DREAMD_PAUSE_AT": "keyframe-denoising"})
    try:
        wait_in(daemon, marker.exists, "the daemon to reach keyframe-denoising")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=STOP_DEADLINE)
    marker.unlink()
    (held,) = rows(daemon, "SELECT id, chain_index FROM keyframes WHERE state = 'executing'")
    before = made_by(daemon, "diffusers")
    run_until(daemon, lambda: made_by(daemon, "diffusers") >= before + 3,
              "three keyframes after the restart")
    invariants.check(daemon.data_dir)
    done = rows(daemon, "SELECT chain_index, count(*) FROM keyframes WHERE state = "
                        "'completed' GROUP BY chain_index HAVING count(*) > 1")
    assert done == [], f"keyframes made twice: {done}"
    (again,) = rows(daemon, "SELECT state, attempt FROM keyframes WHERE id = ?", held[0])
    assert again == ("completed", 2)
    # the restart fed the kept latent of the keyframe before it from the data dir
    assert inputs(log_text(daemon)[len(first):])[0].startswith("latent")


@pytest.mark.slow
def test_the_guard_gives_the_model_back_and_the_resume_loads_it_again(daemon, model, tmp_path):
    from tests.test_guard import GAME, start_game

    config = diffusion_config(model) + (f'[guard]\nknown_games = ["{GAME}"]\n'
                                        "check_interval_seconds = 0.5\n"
                                        "resume_after_seconds = 1.0\n")
    daemon.config.write_text(config)
    proc = daemon.start()
    try:
        wait_in(daemon, lambda: made_by(daemon, "diffusers") >= 2, "keyframes from the model")
        game = start_game(tmp_path / "bin", GAME)
        wait_in(daemon, lambda: "diffusion model unloaded (free" in log_text(daemon),
                "the model unloaded by the guard's free")
        assert status(daemon).get("paused_by") == "guard"
        made = made_by(daemon, "diffusers")
        game.kill()
        game.wait()
        wait_in(daemon, lambda: made_by(daemon, "diffusers") >= made + 2,
                "keyframes from the model after the game")
        assert log_text(daemon).count("diffusion model loaded in") == 2
    finally:
        stop(daemon, proc)


def bad_models(files: dict, tmp: Path) -> dict[str, tuple[dict, list[str]]]:
    """name: ([diffusion] keys, words the one line must have)."""
    whole = files["ckpt"].read_bytes()
    cut = tmp / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    vae = mf.write_safetensors(tmp / "a-vae.safetensors", mf.VAE_FP16)
    lora = mf.write_safetensors(tmp / "xl-lora.safetensors", SDXL_LORA)
    return {
        "missing": ({"model": str(tmp / "absent.safetensors")},
                    ["absent.safetensors", "no such file",
                     "`dreamd models pull stable-diffusion-v1-5/stable-diffusion-v1-5`"]),
        "missing hub id": ({"model": "someone/absent-model"},
                           ["`dreamd models pull someone/absent-model`"]),
        "truncated": ({"model": str(cut)}, ["cut.safetensors: truncated", "again"]),
        "not a checkpoint": ({"model": str(vae)}, ["a-vae.safetensors",
                                                   "not a Stable Diffusion checkpoint"]),
        "lora of another family": ({"lora": str(lora)}, ["xl-lora.safetensors",
                                                         "made for SDXL models"]),
    }


# Every bad input is also refused in-process (test_diffusion_load); a real daemon for
# each is the slow tier's, the fast tier keeps two.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("case", ["missing", "truncated",
                                  pytest.param("missing hub id", marks=SLOW),
                                  pytest.param("not a checkpoint", marks=SLOW),
                                  pytest.param("lora of another family", marks=SLOW)])
def test_a_bad_model_is_one_line_and_the_dream_goes_on(daemon, model, tmp_path, case):
    keys, words = bad_models(model, tmp_path)[case]
    daemon.config.write_text(diffusion_config(model, **keys))
    daemon.env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    run_until(daemon, lambda: made_by(daemon, "procedural") >= 3
              and status(daemon).get("problem"), "keyframes from the fallback")
    lines = [line for line in log_text(daemon).splitlines()
             if " ERROR dreamd.diffusion:" in line or " WARNING dreamd.diffusion:" in line]
    assert len(lines) == 1, lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "the dream goes on with the procedural backend meanwhile" in lines[0]
    st = status(daemon)
    assert st["backend"] == "procedural" and words[0] in st["problem"]
    assert made_by(daemon, "diffusers") == 0
