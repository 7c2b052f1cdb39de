"""`dreamd models pull` against a stand-in of the hub's HTTP API (tests/hub_double.py), never
the real hub: what it fetches, what it says first, a dropped connection and a killed pull
resumed without fetching again the bytes on disk, a corrupt file refused, a disk too small
refused before anything is fetched, and the config lines it ends with, found by locate.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from dreamd.errors import UsageError
from dreamd.models.selection import RepoFile, choose, human
from tests import model_files as mf
from tests.conftest import dreamd_cmd, free_port, mount_tmpfs, wait_for
from tests.hub_double import HubDouble, Repo
from tests.test_cli_imports import PROBE

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LORA = "latent-consistency/lcm-lora-sdv1-5"
BIG = "someone/big-checkpoint"
BIG_FILE = "big-v1.safetensors"


@pytest.fixture
def hub():
    with HubDouble() as double:
        yield double


@pytest.fixture
def env(dreamd_env, tmp_path, hub) -> dict[str, str]:
    """The CLI's environment: huggingface_hub pointed at the stand-in (HF_ENDPOINT) with a
    cache of its own (HF_HOME), nothing of the user's HF settings."""
    out = {k: v for k, v in dreamd_env.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "XDG_CACHE_HOME"}
    out.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
                "HF_HUB_DISABLE_TELEMETRY": "1",
                # a stalled download must be ended by the test, not by a 10 s read timeout
                "HF_HUB_DOWNLOAD_TIMEOUT": "600"})
    return out


def run(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(dreamd_cmd("models", *args), env=env, capture_output=True,
                          text=True, timeout=timeout)


def snapshot(env, repo: Repo) -> Path:
    return (Path(env["HF_HOME"]) / "hub" / ("models--" + repo.repo_id.replace("/", "--"))
            / "snapshots" / repo.commit)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def error_lines(proc) -> list[str]:
    return proc.stderr.strip().splitlines()


# ---------------------------------------------------------------- a whole pull

def test_pull_fetches_what_img2img_needs_and_ends_with_the_config_lines(hub, env):
    repo = hub.add(Repo(SD15, mf.sd15_pipeline_files()))
    # the pull itself imports no torch (the probe wraps the CLI's main)
    proc = subprocess.run([sys.executable, "-c", PROBE, "models", "pull", SD15], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out, imported = proc.stdout.rsplit("IMPORTED=", 1)
    assert "torch" not in json.loads(imported) and "numpy" not in json.loads(imported)
    wanted = mf.SD15_PULLED
    size = sum(len(repo.files[f]) for f in wanted)
    first = out.splitlines()[0]
    # what it needs comes first, in the hub's units, with the free space beside it
    assert first.startswith(f"{SD15} @ {repo.commit[:10]} (main): a diffusers pipeline, fp16")
    assert f"{len(wanted)} files, {human(size)}; to fetch {human(size)};" in first
    assert f"free in {env['HF_HOME']}/hub" in first

    # without a terminal, a line per file instead of a bar
    assert "  fetched unet/diffusion_pytorch_model.fp16.safetensors (2.36 MB)" in out
    snap = snapshot(env, repo)
    assert files_under(snap) == wanted
    for name in wanted:
        assert (snap / name).read_bytes() == repo.files[name]
    # nothing else left the hub: not the fp32, non-EMA or .bin weights, not the safety
    # checker, not the root checkpoint
    got = {r.path for r in hub.file_requests()}
    for name in set(repo.files) - set(wanted):
        assert not any(p.endswith("/" + name) for p in got), name
        if name in repo.lfs:
            assert f"/cdn/{repo.sha256(name)}" not in got, name

    tail = out.strip().splitlines()
    assert tail[-4:] == ["[diffusion]", f'model = "{SD15}"', "",
                         "licence (as the hub lists it): openrail++"]
    assert not proc.stderr.strip()

    # the line works: the backend's own resolver finds the pulled snapshot by that id
    from dreamd.backends.diffusion import locate
    found = locate.locate(SD15, cache_dir=Path(env["HF_HOME"]) / "hub")
    assert found.path == snap and found.family == "sd15"
    assert locate.missing_parts(snap, found.family) == []

    # a second pull finds everything there, checks it, and fetches nothing
    before = len(hub.file_requests())
    again = run(env, "pull", SD15)
    assert again.returncode == 0, again.stderr
    assert "to fetch 0 B" in again.stdout.splitlines()[0]
    assert not any(r.path.startswith("/cdn/") for r in hub.file_requests()[before:])


def test_pull_of_a_lora_says_lora(hub, env):
    repo = hub.add(Repo(LORA, mf.lora_files()))
    proc = run(env, "pull", LORA)
    assert proc.returncode == 0, proc.stderr
    assert files_under(snapshot(env, repo)) == ["pytorch_lora_weights.safetensors"]
    assert "[diffusion]\nlora = \"latent-consistency/lcm-lora-sdv1-5\"\n" in proc.stdout


def test_a_repo_of_several_checkpoints_needs_file_and_then_gets_a_path(hub, env):
    repo = hub.add(Repo("someone/mixes", {
        "a-mix.safetensors": mf.safetensors_bytes(mf.SD15_CHECKPOINT, 20),
        "b-mix-xl.safetensors": mf.safetensors_bytes(mf.SDXL_CHECKPOINT, 21),
        "README.md": b"two mixes\n"}))
    proc = run(env, "pull", repo.repo_id)
    assert proc.returncode == 2
    assert error_lines(proc) == [(
        f"dreamd: {repo.repo_id} holds 2 .safetensors files; choose one with --file NAME: "
        f"a-mix.safetensors ({human(len(repo.files['a-mix.safetensors']))}), "
        f"b-mix-xl.safetensors ({human(len(repo.files['b-mix-xl.safetensors']))})")]
    assert not hub.file_requests()

    proc = run(env, "pull", repo.repo_id, "--file", "*xl*")
    assert proc.returncode == 0, proc.stderr
    target = snapshot(env, repo) / "b-mix-xl.safetensors"
    assert files_under(snapshot(env, repo)) == ["b-mix-xl.safetensors"]
    # one checkpoint in the snapshot: locate.py finds it by the hub id
    assert f'model = "{repo.repo_id}"' in proc.stdout
    # a second one makes the id ambiguous: the lines then give the file's path
    proc = run(env, "pull", repo.repo_id, "--file", "a-mix.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert f'model = "{target.with_name("a-mix.safetensors")}"' in proc.stdout


# ---------------------------------------------------------------- interrupted, resumed

def big_repo(hub) -> Repo:
    return hub.add(Repo(BIG, {BIG_FILE: mf.big_checkpoint_bytes(), "README.md": b"big\n"}))


def range_start(request) -> int:
    return int(request.range.removeprefix("bytes=").rstrip("-")) if request.range else 0


def test_a_dropped_connection_is_resumed_without_fetching_the_bytes_on_disk(hub, env):
    repo = big_repo(hub)
    size = len(repo.files[BIG_FILE])
    cut = 15 * 1024 * 1024
    hub.cut(repo, BIG_FILE, after=cut)
    proc = run(env, "pull", BIG)
    assert proc.returncode == 0, proc.stderr
    first, second = hub.downloads(repo, BIG_FILE)
    assert first.range is None and first.sent == cut
    # the retry asks for the rest of what reached the disk (huggingface_hub writes in 10 MiB
    # chunks, so the bytes of a chunk still in memory when the connection died come again)
    kept = range_start(second)
    assert 0 < kept <= cut and second.status == 206
    assert second.sent == size - kept
    assert first.sent + second.sent - size == cut - kept < 10 * 1024 * 1024 + 1
    data = (snapshot(env, repo) / BIG_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == repo.sha256(BIG_FILE)


def test_a_killed_pull_resumes_where_the_disk_stopped(hub, env):
    repo = big_repo(hub)
    size = len(repo.files[BIG_FILE])
    hub.cut(repo, BIG_FILE, after=13 * 1024 * 1024, stall=True)
    part = (Path(env["HF_HOME"]) / "hub" / ("models--" + BIG.replace("/", "--")) / "blobs"
            / f"{repo.sha256(BIG_FILE)}.incomplete")
    proc = subprocess.Popen(dreamd_cmd("models", "pull", BIG), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: part.is_file() and part.stat().st_size > 0, timeout=120,
                 what="the first chunk on disk")
        proc.send_signal(signal.SIGINT)                 # Ctrl-C
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hub.release.set()
    assert proc.returncode == 130, err
    kept = part.stat().st_size
    assert 0 < kept < size
    lines = error_lines(subprocess.CompletedProcess([], 130, out, err))
    assert lines == [(f"dreamd: interrupted; {human(kept)} of partial files kept in "
                      f"{part.parent}: the same command resumes")]

    listed = run(env, "list", "--json")
    assert json.loads(listed.stdout)["partial"] == [
        {"hub_id": BIG, "bytes": kept, "resume": f"dreamd models pull {BIG}"}]

    before = len(hub.downloads(repo, BIG_FILE))
    proc = run(env, "pull", BIG)
    assert proc.returncode == 0, proc.stderr
    assert f"to fetch {human(size)}, {human(kept)} of it already here" in proc.stdout
    (resumed,) = hub.downloads(repo, BIG_FILE)[before:]
    assert range_start(resumed) == kept and resumed.sent == size - kept
    assert not part.exists()
    data = (snapshot(env, repo) / BIG_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == repo.sha256(BIG_FILE)


def test_on_a_terminal_the_pull_draws_one_progress_bar(hub, env):
    repo = big_repo(hub)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(dreamd_cmd("models", "pull", BIG), env=env, stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    screen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:             # EIO: the child closed the terminal
                return
            if not data:
                return
            screen.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=120)
    reader.join(timeout=60)
    os.close(master)
    assert proc.returncode == 0
    drawn = b"".join(screen).decode(errors="replace")
    size = len(repo.files[BIG_FILE])
    total = f"{size / 1e6:.1f}M"
    assert "pull: 100%" in drawn and f"{total}/{total}" in drawn, drawn
    # on a terminal the bar replaces the line per file a log gets
    assert f"  fetched {BIG_FILE}" not in out and "25.68 MB fetched now" in out


# ---------------------------------------------------------------- refused

def test_a_corrupt_download_is_refused_in_one_line_and_never_enters_the_cache(hub, env):
    repo = hub.add(Repo(SD15, mf.sd15_pipeline_files()))
    bad = "unet/diffusion_pytorch_model.fp16.safetensors"
    hub.corrupt_file(repo, bad)
    proc = run(env, "pull", SD15)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert line.startswith(f"dreamd: {SD15}: {bad}: sha256 ")
    assert f"is not the hub's {repo.sha256(bad)[:16]}…: the download was corrupt and is " \
           f"deleted; run the same command again" in line
    blobs = snapshot(env, repo).parent.parent / "blobs"
    assert not (blobs / repo.sha256(bad)).exists()
    assert not list(blobs.glob("*.incomplete"))
    assert not (snapshot(env, repo) / bad).exists()

    hub.corrupt.clear()
    proc = run(env, "pull", SD15)
    assert proc.returncode == 0, proc.stderr
    assert (snapshot(env, repo) / bad).read_bytes() == repo.files[bad]


def test_a_pull_larger_than_the_free_space_is_refused_before_any_download(hub, env):
    repo = Repo(SD15, mf.sd15_pipeline_files())
    repo.listed_size["unet/diffusion_pytorch_model.fp16.safetensors"] = 10 ** 15   # 1 PB
    hub.add(repo)
    proc = run(env, "pull", SD15)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith(f"dreamd: {SD15} needs 1000.00 TB more in {env['HF_HOME']}/hub, "
                           f"whose disk has ")
    assert line.endswith("free: free some space, or set HF_HOME to a folder on a disk with room")
    assert not any(r.path.startswith("/cdn/") for r in hub.requests)
    assert not (Path(env["HF_HOME"]) / "hub").exists()


def test_a_small_disk_refuses_the_pull_and_stays_empty(hub, env, tmp_path):
    hub.add(Repo(SD15, mf.sd15_pipeline_files()))
    for disk in mount_tmpfs(tmp_path / "small", "2m"):
        env["HF_HOME"] = str(disk / "hf")
        proc = run(env, "pull", SD15)
        assert proc.returncode == 2, proc.stderr
        assert "more in" in error_lines(proc)[0] and len(error_lines(proc)) == 1
        assert list(disk.iterdir()) == []
    assert not any(r.path.startswith("/cdn/") for r in hub.requests)


def test_unknown_repo_revision_and_an_unreachable_hub_are_one_line_each(hub, env):
    hub.add(Repo(LORA, mf.lora_files()))
    proc = run(env, "pull", "nobody/nothing")
    assert proc.returncode == 2
    assert error_lines(proc) == [(f"dreamd: no model nobody/nothing on {hub.url} (a private "
                                  f"one needs `hf auth login`)")]
    proc = run(env, "pull", LORA, "--revision", "v9")
    assert proc.returncode == 2
    assert error_lines(proc) == [f"dreamd: {LORA} has no revision 'v9' on {hub.url}"]
    proc = run(env, "pull", "not a hub id")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1
    assert "is not a hub id" in proc.stderr

    dead = f"http://127.0.0.1:{free_port()}"
    proc = run({**env, "HF_ENDPOINT": dead}, "pull", LORA)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert line.startswith(f"dreamd: cannot reach {dead} (ConnectError")

    proc = run({**env, "HF_HUB_OFFLINE": "1"}, "pull", LORA)
    assert proc.returncode == 2
    assert error_lines(proc) == [("dreamd: HF_HUB_OFFLINE is set: unset it for `dreamd models "
                                  "pull` (the only dreamd command that uses the network)")]


# ---------------------------------------------------------------- the choice, from a listing

def listing(files: dict[str, bytes]) -> list[RepoFile]:
    repo = Repo("x/y", files)
    return [RepoFile(s["rfilename"], s["size"], s["blobId"], s.get("lfs", {}).get("sha256"))
            for s in map(repo.sibling, sorted(files))]


def test_the_choice_of_files_from_a_pipeline_listing():
    files = mf.sd15_pipeline_files()
    chosen = choose(SD15, listing(files), mf.SD15_MODEL_INDEX)
    assert sorted(f.name for f in chosen.files) == mf.SD15_PULLED
    assert chosen.variant == "fp16"
    # no fp16 weights: the plain ones, and no variant to ask diffusers for
    plain = {k: v for k, v in files.items() if ".fp16." not in k}
    chosen = choose(SD15, listing(plain), mf.SD15_MODEL_INDEX)
    assert chosen.variant is None
    assert {f.name for f in chosen.files if f.name.endswith(".safetensors")} == {
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors"}
    # pickled weights only: refused, never fetched
    pickled = {k: v for k, v in plain.items() if not k.startswith("vae/diffusion")}
    pickled["vae/diffusion_pytorch_model.bin"] = b"\x80\x02"
    with pytest.raises(UsageError, match="no .safetensors weights for its vae"):
        choose(SD15, listing(pickled), mf.SD15_MODEL_INDEX)
    # --file takes one file of a pipeline repo, whatever else it holds
    one = choose(SD15, listing(files), None, "v1-5-pruned-emaonly.safetensors")
    assert [f.name for f in one.files] == ["v1-5-pruned-emaonly.safetensors"]
    with pytest.raises(UsageError, match="--file nothing.safetensors: no .safetensors or .ckpt"):
        choose(SD15, listing(files), None, "nothing.safetensors")
