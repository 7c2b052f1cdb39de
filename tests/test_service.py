"""`dreamd service` and `dreamd uninstall` (issue 25): the login service files as each
system reads them, written where the service manager looks (a temp XDG_CONFIG_HOME;
systemctl never runs for real: PATH holds none, and in-process the runner is a
recorder), the unit's ExecStart run for real, and what uninstall lists and deletes on
real files, a ComfyUI folder included."""

from __future__ import annotations

import os
import plistlib
import shlex
import subprocess
from pathlib import Path

import pytest

from dreamd import config, service, uninstall
from tests.conftest import dreamd_cmd


def _cfg(tmp_path: Path, text: str = "") -> config.Config:
    file = tmp_path / "dreamd.toml"
    file.write_text(text, encoding="utf-8")
    return config.load(file, tmp_path / "data dir")


def _no_service_manager(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """PATH with nothing on it: no systemctl or launchctl can be reached."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {**env, "PATH": str(empty)}


def _exec_words(unit: str) -> list[str]:
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    # systemd's quoting is C-style inside double quotes, as shlex reads it; %% and $$
    # are systemd's escapes of % and $
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line[len("ExecStart="):])]


# ---------------------------------------------------------------- systemd

def test_the_systemd_unit_restarts_on_failure_but_not_on_a_config_error(tmp_path):
    cfg = _cfg(tmp_path)
    unit = service.systemd_unit(service.daemon_argv(cfg, python="/opt/my env/bin/python"))
    lines = unit.splitlines()
    for needed in ("[Service]", "Restart=on-failure", "RestartPreventExitStatus=2",
                   "[Install]", "WantedBy=default.target", "Type=simple"):
        assert needed in lines, needed
    assert _exec_words(unit) == ["/opt/my env/bin/python", "-m", "dreamd", "--config",
                                 str(cfg.file.resolve()), "--data-dir",
                                 str(Path(cfg.data_dir).resolve()), "run"]


def test_systemd_words_escape_what_systemd_would_expand():
    argv = ["/p/python", "-m", "dreamd", "--data-dir", "/d/100% $HOME \"x\"", "run"]
    unit = service.systemd_unit(argv)
    assert "100%% $$HOME" in unit
    assert _exec_words(unit) == argv


def test_install_writes_where_systemd_looks_and_enables_it(tmp_path):
    cfg = _cfg(tmp_path)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    svc = service.service_for(cfg, kind="systemd", environ=env)
    ran: list[list[str]] = []
    lines = service.install(svc, lambda c: ran.append(list(c)) or 0)
    unit = tmp_path / "xdg" / "systemd" / "user" / "dreamd.service"
    assert svc.path == unit and unit.read_text(encoding="utf-8") == svc.text
    assert ran == [["systemctl", "--user", "daemon-reload"],
                   ["systemctl", "--user", "enable", "--now", "dreamd.service"]]
    assert any("journalctl --user -u dreamd" in x for x in lines)
    # enabled as systemctl would: the link in default.target.wants
    wants = unit.parent / "default.target.wants"
    wants.mkdir()
    (wants / "dreamd.service").symlink_to(unit)
    ran.clear()
    service.uninstall(svc, lambda c: ran.append(list(c)) or 0)
    assert ran == [["systemctl", "--user", "disable", "--now", "dreamd.service"],
                   ["systemctl", "--user", "daemon-reload"]]
    assert not unit.exists() and not (wants / "dreamd.service").is_symlink()


def test_a_failing_systemctl_is_said_and_the_rest_is_left_to_do(tmp_path):
    cfg = _cfg(tmp_path)
    svc = service.service_for(cfg, kind="systemd",
                              environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    lines = service.install(svc, lambda c: 1)
    assert "  systemctl --user daemon-reload: exit 1; run it yourself to see why" in lines
    assert "  then: systemctl --user enable --now dreamd.service" in lines


def test_the_command_without_systemctl_writes_the_unit_and_says_what_to_run(dreamd_env, tmp_path):
    env = _no_service_manager(dreamd_env, tmp_path)
    proc = subprocess.run(dreamd_cmd("service", "install"), env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    unit = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "dreamd.service"
    assert f"wrote {unit}" in proc.stdout
    assert "run: systemctl --user enable --now dreamd.service" in proc.stdout
    # the unit's own command works: run it (as `config show`, a cheap command) with the
    # environment systemd gives a user unit, no DREAMD_* variables
    words = _exec_words(unit.read_text(encoding="utf-8"))
    assert words[-1] == "run" and words[words.index("--data-dir") + 1] == env["DREAMD_DATA_DIR"]
    bare = {k: v for k, v in env.items() if not k.startswith("DREAMD_")}
    shown = subprocess.run([*words[:-1], "status", "--json"], env=bare, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert env["DREAMD_DATA_DIR"] in shown.stdout
    gone = subprocess.run(dreamd_cmd("service", "uninstall"), env=env, capture_output=True,
                          text=True, timeout=120)
    assert gone.returncode == 0 and not unit.exists(), gone.stderr
    assert "run: systemctl --user stop dreamd.service" in gone.stdout


# ---------------------------------------------------------------- Windows, macOS

def test_the_windows_startup_entry_starts_pythonw_without_a_console(tmp_path):
    cfg = _cfg(tmp_path)
    argv = service.daemon_argv(cfg, python=r"C:\Users\Zoë Doe\dreamd\.venv\Scripts\python.exe")
    svc = service.service_for(cfg, kind="startup", python=argv[0],
                              environ={"APPDATA": r"C:\Users\Zoë Doe\AppData\Roaming"})
    assert str(svc.path) == (r"C:\Users\Zoë Doe\AppData\Roaming\Microsoft\Windows\Start Menu"
                             r"\Programs\Startup\dreamd.cmd")
    text = service.startup_cmd(argv)
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    start = next(x for x in text.split("\r\n") if x.startswith("start "))
    assert start.startswith('start "dreamd" "C:\\Users\\Zoë Doe\\dreamd\\.venv\\Scripts\\pythonw.exe" -m dreamd')
    assert start.endswith(" run")
    assert "%%" in service.startup_cmd([argv[0], "-m", "dreamd", "--data-dir", r"D:\100%", "run"])


def test_the_macos_launch_agent_runs_at_load_and_restarts_after_a_failure(tmp_path):
    cfg = _cfg(tmp_path)
    svc = service.service_for(cfg, kind="launchd", environ={"HOME": str(tmp_path)})
    assert svc.path == tmp_path / "Library" / "LaunchAgents" / "io.github.dreamd.plist"
    plist = plistlib.loads(svc.text.encode())
    assert plist["ProgramArguments"] == service.daemon_argv(cfg)
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert svc.enable == [["launchctl", "load", "-w", str(svc.path)]]


# ---------------------------------------------------------------- uninstall

def _comfyui(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI"
    for rel in ("models/vae_approx/taesd_decoder.pth", "input/dreamd/in-0001.png",
                "input/mine.png", "output/dreamd/keyframe_00001_.png", "output/other_00001_.png",
                "temp/dreamd_preview_00001_.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 100)
    return root


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_uninstall_dry_run_lists_every_path_and_deletes_nothing(dreamd_env, tmp_path):
    env = _no_service_manager(dreamd_env, tmp_path)
    root = _comfyui(tmp_path)
    conf = tmp_path / "dreamd.toml"
    conf.write_text(f"[comfyui]\nmodels_dir = '{root / 'models'}'\n"
                    f"[display]\noutput_dir = '{tmp_path / 'shown'}'\n", encoding="utf-8")
    data = Path(env["DREAMD_DATA_DIR"])
    (data / "logs").mkdir(parents=True)
    (data / "logs" / "dreamd.log").write_text("a log\n")
    (tmp_path / "shown").mkdir()
    assert subprocess.run(dreamd_cmd("--config", str(conf), "service", "install"), env=env,
                          capture_output=True, timeout=120).returncode == 0
    before = _tree(tmp_path)
    proc = subprocess.run(dreamd_cmd("--config", str(conf), "uninstall", "--dry-run"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    unit = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "dreamd.service"
    for path in (data, conf, tmp_path / "shown", unit, root / "input" / "dreamd",
                 root / "output" / "dreamd", root / "temp" / "dreamd_preview_00001_.png"):
        assert f"  {path}  (" in out, (path, out)
    for path in (root / "input" / "mine.png", root / "output" / "other_00001_.png",
                 root / "models"):
        assert f"  {path}  (" not in out
    assert "dry run: nothing was deleted" in out and _tree(tmp_path) == before


def test_uninstall_yes_deletes_what_dreamd_owns_and_nothing_else(dreamd_env, tmp_path):
    env = _no_service_manager(dreamd_env, tmp_path)
    root = _comfyui(tmp_path)
    conf = tmp_path / "dreamd.toml"
    conf.write_text(f"[comfyui]\nmodels_dir = '{root / 'models'}'\n", encoding="utf-8")
    data = Path(env["DREAMD_DATA_DIR"])
    (data / "frames").mkdir(parents=True)
    (data / "frames" / "f.png").write_bytes(b"x")
    (data / ".dreamd-id").write_text("id\n")
    subprocess.run(dreamd_cmd("--config", str(conf), "service", "install"), env=env,
                   capture_output=True, timeout=120, check=True)
    # without a terminal and without --yes: refused, nothing deleted
    refused = subprocess.run(dreamd_cmd("--config", str(conf), "uninstall"), env=env,
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode == 2 and "--yes" in refused.stderr and data.exists()
    # a daemon alive on the data dir (this test's own pid in the pid file): refused
    (data / "dreamd.pid").write_text(f"{os.getpid()}\n")
    busy = subprocess.run(dreamd_cmd("--config", str(conf), "uninstall", "--yes"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert busy.returncode == 1 and "dreamd stop" in busy.stderr and data.exists()
    (data / "dreamd.pid").unlink()
    proc = subprocess.run(dreamd_cmd("--config", str(conf), "uninstall", "--yes"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not data.exists() and not conf.exists()
    assert not (Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "dreamd.service").exists()
    assert _tree(root) == {"models", "models/vae_approx", "models/vae_approx/taesd_decoder.pth",
                           "input", "input/mine.png", "output", "output/other_00001_.png",
                           "temp"}
    assert "left: the virtual environment dreamd runs from" in proc.stdout


def test_a_remote_comfyui_is_named_with_what_to_delete_there(tmp_path):
    cfg = _cfg(tmp_path, '[generation]\nbackend = "comfyui"\n'
                         '[comfyui]\nurls = ["http://gpu-box:8188"]\n')
    note = uninstall.remote_note(cfg)
    assert note and "http://gpu-box:8188" in note and "input/dreamd/" in note


@pytest.mark.parametrize("kind", ["systemd", "launchd", "startup"])
def test_show_prints_each_system_s_file_and_changes_nothing(dreamd_env, tmp_path, kind):
    env = _no_service_manager(dreamd_env, tmp_path)
    before = _tree(tmp_path)
    proc = subprocess.run(dreamd_cmd("service", "show", "--system", kind), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# {kind}: ")
    assert "-m dreamd" in proc.stdout or "<string>dreamd</string>" in proc.stdout
    assert _tree(tmp_path) == before


def test_a_folder_that_is_not_a_data_dir_is_never_deleted_whole(tmp_path):
    """system.data_dir pointed by mistake at a folder of other things: left alone; an
    output dir elsewhere loses only dreamd's three files."""
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.odt").write_bytes(b"precious")
    shown = tmp_path / "desk"
    shown.mkdir()
    for name in ("current_frame.png", "previous_frame.png", "status.json", "notes.txt"):
        (shown / name).write_bytes(b"x")
    cfg = _cfg(tmp_path, f"[display]\noutput_dir = '{shown}'\n")
    cfg.system.data_dir = str(home)
    items = [i for i in uninstall.owned_paths(cfg) if Path(i.path) in (home, shown)]
    lines = uninstall.delete(cfg, items)
    assert (home / "Documents" / "thesis.odt").read_bytes() == b"precious"
    assert any("does not look like a dreamd data dir" in x for x in lines)
    assert sorted(p.name for p in shown.iterdir()) == ["notes.txt"]
