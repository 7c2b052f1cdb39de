"""`dreamd uninstall`: every path dreamd owns on this machine, listed, and deleted on
confirmation: the data dir (ledger, frames, logs), an output dir or ComfyUI log kept
elsewhere, the config file, the login service, the Rainmeter skin, and what the daemon
left in the folders of a ComfyUI whose place it knows (`comfyui.models_dir`). The
virtual environment and the checkout are listed last and never deleted by the
command that runs from them. No torch.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterator

from dreamd import service as service_mod
from dreamd.errors import DaemonError, UsageError


@dataclass(frozen=True)
class Owned:
    path: PurePath
    what: str
    deletable: bool = True        # False: listed with the command to delete it by hand
    only: tuple[str, ...] = ()    # a folder not dreamd's alone: only these names go (then
                                  # the folder, when that left it empty)
    marks: tuple[str, ...] = ()   # a folder deleted whole only when it holds one of these


DATA_DIR_MARKS = ("dreamd.db", ".dreamd-id")
OUTPUT_FILES = ("current_frame.png", "previous_frame.png", "status.json")


def _size(path: Path) -> int:
    try:
        if path.is_file() or path.is_symlink():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def comfyui_root(cfg) -> Path | None:
    """The ComfyUI folder dreamd knows: the parent of `comfyui.models_dir`."""
    models = cfg.comfyui.models_dir
    return Path(models).parent if models else None


def comfyui_leftovers(cfg) -> Iterator[Owned]:
    """What the daemon put in a local ComfyUI's folders: its uploads (input/<upload
    subfolder>/), the keyframes its workflows saved (output/dreamd*), previews (temp/dreamd*)."""
    root = comfyui_root(cfg)
    if root is None:
        return
    sub = cfg.comfyui.upload_subfolder
    candidates = [root / "input" / sub]
    for folder in ("output", "temp"):
        base = root / folder
        if base.is_dir():
            candidates += sorted(base.glob("dreamd*"))
    for path in candidates:
        if path.exists():
            yield Owned(path, f"ComfyUI {path.parent.name}/: images the daemon "
                              f"{'uploaded' if path.parent.name == 'input' else 'had saved'}")


def owned_paths(cfg, *, environ=None, skins_dir: str | None = None) -> list[Owned]:
    data = Path(cfg.data_dir)
    out = [Owned(data, "data dir: the ledger, frames, keyframes, logs, seeds you added",
                 marks=DATA_DIR_MARKS)]
    if cfg.display.output_dir and not _inside(Path(cfg.display.output_dir), data):
        out.append(Owned(Path(cfg.display.output_dir), "output dir (display.output_dir): "
                         "its frame files and status.json", only=OUTPUT_FILES))
    if cfg.comfyui.log_file and not _inside(Path(cfg.comfyui.log_file), data):
        out.append(Owned(Path(cfg.comfyui.log_file), "ComfyUI's log (comfyui.log_file)"))
    if cfg.file is not None:
        out.append(Owned(Path(cfg.file), "config file: your settings"))
    svc = service_mod.service_for(cfg, environ=environ)
    if Path(svc.path).exists():
        out.append(Owned(svc.path, f"login service ({svc.system})"))
    try:
        from dreamd.rainmeter import SKIN_NAME, skins_dir as find_skins
        skin = Path(find_skins(skins_dir)) / SKIN_NAME
        if skin.exists():
            out.append(Owned(skin, "the Rainmeter skin"))
    except (UsageError, OSError):
        pass                     # no Rainmeter here (or its folder unknown)
    out.extend(comfyui_leftovers(cfg))
    if sys.prefix != sys.base_prefix:
        out.append(Owned(Path(sys.prefix), "the virtual environment dreamd runs from",
                         deletable=False))
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "dreamd").is_dir():
        out.append(Owned(checkout, "the checkout (source, seeds, workflows, skin)",
                         deletable=False))
    return out


def remote_note(cfg) -> str | None:
    if cfg.generation.backend != "comfyui" or comfyui_root(cfg) is not None:
        return None
    return (f"ComfyUI's own folders ({', '.join(cfg.comfyui.urls)}) are not known here "
            f"(comfyui.models_dir is empty): delete input/{cfg.comfyui.upload_subfolder}/ "
            f"and output/dreamd*, temp/dreamd* there yourself")


def _remove_command(path: PurePath) -> str:
    if os.name == "nt":
        return f'Remove-Item -Recurse -Force "{path}"'
    return f"rm -rf '{path}'"


def report(items: list[Owned]) -> list[str]:
    lines = []
    for item in items:
        path = Path(item.path)
        if not path.exists():
            lines.append(f"  {item.path}  ({item.what}; not there)")
            continue
        size = _size(path)
        shown = f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"
        lines.append(f"  {item.path}  ({item.what}; {shown})")
    return lines


def daemon_running(cfg) -> int | None:
    from dreamd.platform import pid_alive
    try:
        pid = int(cfg.pid_path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and pid != os.getpid() and pid_alive(pid) else None


def delete(cfg, items: list[Owned]) -> list[str]:
    """Delete what is deletable: the service is disabled first, then files and folders."""
    pid = daemon_running(cfg)
    if pid:
        raise DaemonError(f"a dreamd (pid {pid}) runs on {cfg.data_dir}: stop it first "
                          f"(`dreamd stop`), then uninstall")
    lines = []
    svc = service_mod.service_for(cfg)
    for item in items:
        if not item.deletable:
            continue
        path = Path(item.path)
        if path == Path(svc.path):
            lines += service_mod.uninstall(svc, service_mod.runner_for(svc))
            continue
        if not path.exists() and not path.is_symlink():
            continue
        try:
            lines.append(_delete(item, path))
        except OSError as exc:
            lines.append(f"could not delete {path}: {exc.strerror or exc}")
    for item in items:
        if not item.deletable:
            lines.append(f"left: {item.what}; delete it yourself: {_remove_command(item.path)}")
    return lines


def _delete(item: Owned, path: Path) -> str:
    if item.only:
        for name in item.only:
            (path / name).unlink(missing_ok=True)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            return f"deleted {path}"
        return f"deleted dreamd's files in {path} ({', '.join(item.only)})"
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return f"deleted {path}"
    if item.marks and any(path.iterdir()) and not any((path / m).exists() for m in item.marks):
        # a data dir set to a folder that holds other things (a typo in system.data_dir)
        return (f"left {path}: it does not look like a dreamd data dir (no "
                f"{' or '.join(item.marks)}); look, and delete it yourself")
    shutil.rmtree(path)
    return f"deleted {path}"
