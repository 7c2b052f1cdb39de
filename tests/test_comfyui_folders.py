"""ComfyUI's own folders stay bounded: inputs go up under two names, overwritten; the
shipped workflows keep results out of output/ (PreviewImage: temp/); a ComfyUI whose
folders the daemon knows has each keyframe's files removed once the ledger has the
keyframe, and what earlier versions left swept once (their names only). Against the
ComfyUI double, whose input/, output/ and temp/ are real folders named and overwritten
as ComfyUI does."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from dreamd import config
from dreamd.backends.comfyui import folders
from dreamd.backends.comfyui.backend import INPUT_SLOTS
from dreamd.backends.comfyui.folders import ComfyFolders, Tidy
from tests.comfyui_double import ComfyUIDouble, save_counter
from tests.conftest import wait_for
from tests.test_comfyui_backend import CKPT, make, request  # noqa: F401  (fixture)


@pytest.fixture
def double(tmp_path):
    with ComfyUIDouble(checkpoints=[CKPT], root=tmp_path / "ComfyUI") as d:
        yield d


def chain(backend, n: int, start: int = 0) -> list:
    """n keyframes as the daemon makes them: each the img2img of the one before."""
    image, results = Image.new("RGB", (64, 32), (200, 100, 50)), []
    for k in range(start, start + n):
        result = backend.generate(replace(request(chain_index=k, seed=k), image=image))
        results.append(result)
        image = result.image
    return results


# ---------------------------------------------------------------- the double's folders

def test_the_double_names_and_overwrites_like_comfyui(double):
    """Its folders behave as the transcript shows (sections 9-12) and as ComfyUI's
    get_save_image_path counts: a counter goes on from the files there."""
    client = folders_client(double)
    a, b = png((1, 2, 3)), png((4, 5, 6))
    assert client.upload_image(a, subfolder="s") == f"s/{content(a)}"
    assert double.files.names("input", "s") == [content(a)]
    ref = client.upload_as(a, "slot.png", subfolder="s")
    assert client.upload_as(b, "slot.png", subfolder="s") == ref == "s/slot.png"
    assert (double.root / "input" / "s" / "slot.png").read_bytes() == b    # overwritten
    out = double.root / "output" / "x"
    out.mkdir(parents=True)
    (out / "kf_00007_.png").write_bytes(b"")
    (out / "other_00100_.png").write_bytes(b"")
    assert save_counter(out, "kf") == 8 and save_counter(out, "new") == 1


def folders_client(double):
    from dreamd.backends.comfyui.client import ComfyUIClient
    return ComfyUIClient(double.url, client_id="t")


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def content(data: bytes) -> str:
    from dreamd.backends.comfyui.client import content_name
    return content_name(data)


# ---------------------------------------------------------------- what a remote server keeps

def test_many_keyframes_leave_two_inputs_and_nothing_in_output(double, make):
    """No folder known (a remote server): inputs take INPUT_SLOTS names, overwritten;
    results go to temp/ (PreviewImage), one per keyframe, until ComfyUI restarts."""
    backend = make(double.url, input_tag="dreamd_t")
    results = chain(backend, 24)
    assert len({r.info["upload"] for r in results}) == INPUT_SLOTS
    assert double.files.names("input", "dreamd") == [f"dreamd_t_input_{i}.png"
                                                     for i in range(INPUT_SLOTS)]
    assert not any(kind == "output" for kind, _, _ in double.files)
    assert len(double.files.names("temp")) == 24
    # the inputs were the keyframes themselves: slot k % 2 holds keyframe k's input
    posted = [r.body["prompt"]["2"]["inputs"]["image"] for r in double.requests
              if r.path == "/prompt"]
    assert posted[:4] == [f"dreamd/dreamd_t_input_{k % 2}.png" for k in range(4)]
    double.forget()                  # a restart: ComfyUI empties temp/
    assert double.files.names("temp") == []


def test_two_data_dirs_sharing_a_server_keep_their_own_slots(double, make):
    chain(make(double.url, input_tag="dreamd_aaaa"), 3)
    chain(make(double.url, input_tag="dreamd_bbbb"), 3)
    assert len(double.files.names("input", "dreamd")) == 2 * INPUT_SLOTS


# ---------------------------------------------------------------- a ComfyUI whose folders we know

def known(double) -> ComfyFolders:
    return ComfyFolders(double.root / "input", double.root / "output", double.root / "temp",
                        "test")


def test_a_keyframe_s_files_go_once_the_ledger_has_it_and_not_before(double, make):
    states: dict[tuple[int, str], str] = {}
    tidy = Tidy(known(double), [double.url], lambda k, p: states.get((k, p)))
    backend = make(double.url, input_tag="dreamd_t")
    for k, result in enumerate(chain(backend, 3)):
        states[(k, result.info["prompt_id"])] = "executing"
        tidy.add(result.info, k)
    assert tidy.tidy() == 0 and len(double.files.names("temp")) == 3   # not in the ledger yet
    first = next(iter(states))
    states[first] = "completed"
    # keyframe 0's output; its input slot now holds keyframe 2's input (other bytes): kept
    assert tidy.tidy() == 1
    assert len(double.files.names("temp")) == 2
    assert double.files.names("input", "dreamd") == ["dreamd_t_input_0.png",
                                                     "dreamd_t_input_1.png"]
    for key in states:
        states[key] = "completed"
    tidy.tidy()
    assert double.files.names("temp") == [] and double.files.names("input", "dreamd") == []
    assert tidy.pending == []


def test_while_a_keyframe_is_made_the_inputs_wait(double, make):
    """An input slot may have just been overwritten by the keyframe being made: during a
    keyframe only outputs go, the inputs at the next pause (or the stop)."""
    tidy = Tidy(known(double), [double.url], lambda k, p: "completed")
    result = chain(make(double.url, input_tag="dreamd_t"), 1)[0]
    tidy.add(result.info, 0)
    assert tidy.tidy(inputs=False) == 1
    assert double.files.names("temp") == [] and len(double.files.names("input", "dreamd")) == 1
    assert [files for _, _, files in tidy.pending] == [[
        ("input", "dreamd", "dreamd_t_input_0.png", result.info["upload_sha256"])]]
    assert tidy.tidy() == 1 and double.files.names("input", "dreamd") == []
    assert tidy.pending == []


def test_a_file_rewritten_since_is_not_removed(double, make):
    tidy = Tidy(known(double), [double.url], lambda k, p: "completed")
    result = chain(make(double.url, input_tag="dreamd_t"), 1)[0]
    temp = double.root / "temp" / result.info["output"]
    temp.write_bytes(b"someone else's file now")
    tidy.add(result.info, 0)
    assert tidy.tidy() == 1                        # the input only
    assert temp.read_bytes() == b"someone else's file now"


def test_a_remote_server_s_files_are_left_alone(double, make):
    """A local path cannot name a remote server's folders: only servers on this machine
    are tidied."""
    tidy = Tidy(known(double), ["http://comfy.example:8188"], lambda k, p: "completed")
    result = chain(make(double.url, input_tag="dreamd_t"), 1)[0]
    tidy.add(result.info, 0)
    assert tidy.pending == [] and tidy.tidy() == 0
    assert len(double.files.names("temp")) == 1


@pytest.mark.slow
def test_many_keyframes_through_the_daemon_leave_nothing_behind(daemon, double):
    """The daemon on the double, comfyui.models_dir naming the double's models/: after
    many keyframes its input/ and temp/ hold only what is in flight, output/ nothing;
    what an earlier version left there is swept, a user's files stay."""
    from tests.test_comfyui_daemon import comfy_config, stop

    old_out, old_in = double.root / "output" / "dreamd", double.root / "input" / "dreamd"
    old_out.mkdir(parents=True)
    old_in.mkdir(parents=True, exist_ok=True)
    for name in ("keyframe_00001_.png", "keyframe_00002_.png", "seed_00001_.png"):
        (old_out / name).write_bytes(b"old")
    (old_in / "dreamd_0123456789abcdef.png").write_bytes(b"old")
    (old_in / "dreamd_0123456789abcdef (1).png").write_bytes(b"old")
    users = [old_out / "keyframe_final.png", old_in / "holiday.png",
             double.root / "output" / "ComfyUI_00001_.png"]
    for path in users:
        path.write_bytes(b"mine")
    daemon.config.write_text(comfy_config([double.url],
                                          models_dir=str(double.root / "models")))
    proc = daemon.start()

    def completed() -> int:
        try:
            conn = sqlite3.connect(daemon.data_dir / "dreamd.db")
            try:
                return conn.execute("SELECT count(*) FROM keyframes WHERE state = "
                                    "'completed' AND backend = 'comfyui'").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.OperationalError:
            return 0
    try:
        wait_for(lambda: completed() >= 12, timeout=180,
                 what=f"12 keyframes from ComfyUI:\n{daemon.output()[-3000:]}")
        # what is in flight at most: the keyframe just made, the one being recorded, one
        # recorded since the last tidy (every 0.5 s)
        assert len(double.files.names("temp")) <= 3
        assert len(double.files.names("input", "dreamd")) <= INPUT_SLOTS + 1   # + holiday
    finally:
        stop(proc)
    assert sorted(p.name for p in old_out.iterdir()) == ["keyframe_final.png"]
    assert all(path.read_bytes() == b"mine" for path in users)
    # after the stop: the keyframe the stop released keeps its files (it may be fetched
    # again at the next start), nothing else
    assert len(double.files.names("temp")) <= 2
    left = [n for n in double.files.names("input", "dreamd") if n != "holiday.png"]
    assert len(left) <= INPUT_SLOTS
    assert all(re.fullmatch(r"dreamd_[0-9a-f]{8}_input_\d\.png", n) for n in left), left
    assert [k for k in double.files if k[0] == "output"] == [("output", "", "ComfyUI_00001_.png"),
                                                             ("output", "dreamd",
                                                              "keyframe_final.png")]
    log = (daemon.data_dir / "logs" / "dreamd.log").read_text()
    assert "removed 5 file(s) earlier versions of dreamd left" in log


# ---------------------------------------------------------------- where the folders are

def test_the_folders_of_a_supervised_comfyui_come_from_its_command(tmp_path):
    cwd = tmp_path / "portable"
    base = folders.from_command(["python_embeded/python.exe", "-s", "ComfyUI/main.py",
                                 "--windows-standalone-build"], cwd)
    assert (base.input, base.output, base.temp) == (cwd / "ComfyUI/input",
                                                    cwd / "ComfyUI/output",
                                                    cwd / "ComfyUI/temp")
    moved = folders.from_command(["python", "main.py", "--output-directory", "/srv/out",
                                  "--temp-directory=/scratch", "--input-directory", "in"], cwd)
    assert (moved.input, moved.output, moved.temp) == (cwd / "in", Path("/srv/out"),
                                                       Path("/scratch/temp"))
    based = folders.from_command(["comfy", "--base-directory", "/data/comfy"], cwd)
    assert based.temp == Path("/data/comfy/temp")
    assert folders.from_command(["comfyui-server", "--port", "8188"], cwd) is None


def test_models_dir_names_a_comfyui_tree_only_when_it_is_one(tmp_path):
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    assert folders.from_models_dir(tmp_path / "ComfyUI" / "models") is None
    (tmp_path / "ComfyUI" / "output").mkdir()
    found = folders.from_models_dir(tmp_path / "ComfyUI" / "models")
    assert found.temp == tmp_path / "ComfyUI" / "temp"
    cfg = config.parse(f'[comfyui]\nmodels_dir = {json.dumps(str(tmp_path / "ComfyUI/models"))}\n')
    assert folders.locate(cfg) == found


def test_a_name_that_would_leave_its_folder_is_refused(tmp_path):
    f = ComfyFolders(tmp_path / "in", tmp_path / "out", tmp_path / "tmp", "t")
    assert f.path("temp", "", "a.png") == (tmp_path / "tmp" / "a.png").resolve()
    assert f.path("temp", "../in", "a.png") is None
    assert f.path("temp", "", "..") is None and f.path("models", "", "a.png") is None


def test_the_sweep_takes_old_dreamd_names_once_and_nothing_else(tmp_path):
    f = ComfyFolders(tmp_path / "input", tmp_path / "output", tmp_path / "temp", "t")
    made = {"input/dreamd/dreamd_00112233aabbccdd.png": True,
            "input/dreamd/dreamd_00112233aabbccdd (2).png": True,
            "input/dreamd/dreamd_0011.png": False, "input/dreamd/photo.png": False,
            "input/dreamd_00112233aabbccdd.png": False,
            "output/dreamd/keyframe_00041_.png": True, "output/dreamd/seed_00001_.png": True,
            "output/dreamd/keyframe_00041_.png.txt": False,
            "output/keyframe_00001_.png": False, "output/dreamd/ComfyUI_00001_.png": False}
    for rel in made:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    assert folders.sweep_once(f, "dreamd", data) == 4
    assert {rel for rel in made if (tmp_path / rel).exists()} == {
        rel for rel, old in made.items() if not old}
    (tmp_path / "output/dreamd/keyframe_00042_.png").write_bytes(b"x")
    assert folders.sweep_once(f, "dreamd", data) == 0          # once per data dir
    assert (tmp_path / "output/dreamd/keyframe_00042_.png").exists()


def test_input_tags_differ_by_data_dir(tmp_path):
    from dreamd.backends.comfyui.daemon_backend import input_tag
    a, b = config.parse(""), config.parse("")
    a.system.data_dir, b.system.data_dir = str(tmp_path / "a"), str(tmp_path / "b")
    assert input_tag(a) != input_tag(b) and input_tag(a) == input_tag(a)
    assert input_tag(a).startswith("dreamd_") and len(input_tag(a)) == 15


# ---------------------------------------------------------------- doctor

def test_doctor_says_what_a_remote_server_keeps_and_how_to_bound_it(tmp_path):
    cfg = config.parse('[comfyui]\nurls = ["http://gpu-box.lan:8188", "http://127.0.0.1:8188"]\n')
    verdict, detail = folders.describe(cfg)
    assert verdict == "ok"
    assert "http://gpu-box.lan:8188: dreamd cannot reach its folders" in detail
    assert "input/dreamd/ holds at most 2 uploads" in detail
    assert "one PNG in its temp/, which ComfyUI empties only when it starts" in detail
    assert "restart it now and then" in detail
    # a server on this machine: the key that lets dreamd tidy it
    assert "set comfyui.models_dir to its models folder" in detail
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    (tmp_path / "ComfyUI" / "input").mkdir()
    cfg.comfyui.models_dir = str(tmp_path / "ComfyUI" / "models")
    _, detail = folders.describe(cfg)
    assert "http://127.0.0.1:8188: folders known from comfyui.models_dir" in detail


def test_doctor_warns_about_a_workflow_that_saves_into_output(tmp_path):
    wf = json.loads((Path(__file__).parents[1] / "workflows" / "sd15_img2img.json").read_text())
    wf["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0],
                                                      "filename_prefix": "mine/kf"}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(wf))
    cfg = config.parse(f'[comfyui]\nurls = ["http://gpu-box.lan:8188"]\n'
                       f'workflow = {json.dumps(str(path))}\n')
    verdict, detail = folders.describe(cfg)
    assert verdict == "warning" and "stays in its output/" in detail
    assert "ends in PreviewImage" in detail
