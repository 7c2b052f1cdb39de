"""`dreamd rainmeter install`: the skin (rainmeter_skin/) copied into Rainmeter's Skins
folder as DreamWindow, with @Resources/Variables.inc written for this install: the data
dir, the output dir, and the python that runs dreamd (buttons) and pythonw (the hidden
launcher), so the skin works without editing anything.

Rainmeter reads non-ASCII text only from UTF-16 LE files with a byte order mark, so
Variables.inc (which holds the user's paths: C:\\Users\\Zoë\\…) is written that way;
the skin's own files are pure ASCII.
"""

from __future__ import annotations

import configparser
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from datetime import datetime
from pathlib import Path, PureWindowsPath
from typing import Any, Mapping

from dreamd import platform
from dreamd.errors import UsageError

SKIN_NAME = "DreamWindow"
BOM = "\ufeff"
FADE_SHARE = 0.8        # the crossfade takes this share of one frame
FADE_STEPS = 8


def skin_source() -> Path:
    """The checkout's rainmeter_skin/, else the copy installed with the package."""
    checkout = Path(__file__).resolve().parents[1] / "rainmeter_skin"
    if (checkout / "DreamWindow.ini").is_file():
        return checkout
    from importlib import resources
    return Path(str(resources.files("dreamd") / "rainmeter_skin"))


def read_ini_text(path: Path) -> str:
    """An INI file as Windows reads it: UTF-16 with a BOM, else UTF-8 (or ANSI)."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig", errors="replace")


def skins_dir(explicit: str | None = None, *, environ: Mapping[str, str] | None = None,
              winreg: Any = None, windows: bool = platform.WINDOWS) -> Path | PureWindowsPath:
    """Where Rainmeter looks for skins: --skins-dir; else Rainmeter.ini's SkinPath (the
    folder a user may have moved in Rainmeter's settings); else Documents\\Rainmeter\\Skins,
    with Documents from the registry (it follows OneDrive and redirections)."""
    if explicit:
        return Path(explicit).expanduser()
    if not windows:
        raise UsageError("Rainmeter runs on Windows: give the Skins folder with "
                         "--skins-dir DIR (e.g. a copy to move there)")
    environ = os.environ if environ is None else environ
    appdata = environ.get("APPDATA")
    if appdata:
        ini = Path(appdata) / "Rainmeter" / "Rainmeter.ini"
        try:
            parser = configparser.ConfigParser(interpolation=None, strict=False)
            parser.read_string(read_ini_text(ini))
            found = parser.get("Rainmeter", "SkinPath", fallback="").strip()
            if found:
                return platform.WinPath(platform.expand_windows_vars(found, environ))
        except (OSError, configparser.Error):
            pass
    return platform.documents_dir(winreg=winreg, environ=environ) / "Rainmeter" / "Skins"


def command_args(cfg) -> str:
    """What follows `python -m dreamd` for every command the skin runs: this install's
    data dir, and its config file when one was found (Rainmeter's working directory is
    not the one `./dreamd.toml` was found in), quoted by the rules Windows programs
    parse their command line with."""
    args = ["--data-dir", str(cfg.data_dir)]
    if cfg.file is not None:
        file = cfg.file if cfg.file.is_absolute() else Path(cfg.file).resolve()
        args = ["--config", str(file), *args]
    return subprocess.list2cmdline(args)


def variables(cfg, *, python: str | None = None, autostart: bool = True) -> str:
    """The text of Variables.inc for this install."""
    exe, exe_hidden = platform.python_for_windows(python)
    fps = cfg.display.fps
    step_ms = max(1, round(1000 * FADE_SHARE / fps / FADE_STEPS))
    width, height = cfg.generation.resolution
    lines = [
        "[Variables]",
        f"; written by `dreamd rainmeter install` on {datetime.now():%Y-%m-%d %H:%M}: this",
        "; install's paths. Install again after moving dreamd or its data dir.",
        f"DataDir={cfg.data_dir}",
        f"OutputDir={cfg.output_dir}",
        f"Python={exe}",
        f"PythonW={exe_hidden}",
        f"DreamdArgs={command_args(cfg)}",
        f"AutoStart={1 if autostart else 0}",
        "; the picture's size (generation.resolution) and a crossfade shorter than one",
        f"; frame at display.fps = {fps:g}",
        f"Width={width}",
        f"Height={height}",
        f"FadeSteps={FADE_STEPS}",
        f"FadeStepMs={step_ms}",
    ]
    for line in lines[3:9]:
        if "\n" in line or "\r" in line:
            raise UsageError(f"cannot write {line.split('=')[0]} into Variables.inc: the "
                             f"path holds a line break")
    return "\r\n".join(lines) + "\r\n"


def install(cfg, target: Path, *, python: str | None = None, autostart: bool = True) -> Path:
    """Copy the skin to `target`/DreamWindow (replacing an older copy's files, keeping
    nothing else of it) and write its Variables.inc; returns the skin's folder."""
    source = skin_source()
    skin = Path(target) / SKIN_NAME
    try:
        skin.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, skin, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.md", ".gitattributes", "*.ps1"))
        inc = skin / "@Resources" / "Variables.inc"
        inc.write_bytes((BOM + variables(cfg, python=python, autostart=autostart))
                        .encode("utf-16-le"))
    except OSError as exc:
        raise UsageError(f"cannot install the skin into {skin}: {exc.strerror or exc} "
                         f"(give another folder with --skins-dir)") from None
    return skin


def run_install(cfg, skins: str | None, autostart: bool) -> int:
    target = skins_dir(skins)
    skin = install(cfg, Path(target), autostart=autostart)
    print(f"installed the Dream Window skin in {skin}")
    print(f"  data dir {cfg.data_dir}, output {cfg.output_dir}")
    print(f"  commands: {sys.executable} -m dreamd {command_args(cfg)} …")
    print("Load it: Rainmeter > Manage > Refresh all, then DreamWindow > DreamWindow.ini "
          "> Load" + (" (it starts `dreamd run` when none runs)" if autostart else ""))
    return 0


def package(out: Path) -> Path:
    """A .rmskin of the skin, for Rainmeter's Skin Installer (double-click): a zip with
    RMSKIN.ini and Skins\\DreamWindow\\…, then the 16-byte footer the installer checks
    (the zip's size, a flags byte, "RMSKIN"). Its Variables.inc is the template: after
    installing it, run `dreamd rainmeter install` (or edit the file) for this machine's
    paths; a later .rmskin keeps the values already installed (VariableFiles)."""
    from dreamd import __version__

    source, out = skin_source(), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = "\r\n".join([
        "[rmskin]", "Name=Dream Window", "Author=dreamd", f"Version={__version__}",
        "LoadType=Skin", f"Load={SKIN_NAME}\\DreamWindow.ini",
        f"VariableFiles={SKIN_NAME}\\@Resources\\Variables.inc",
        "MinimumRainmeter=4.5.0", "MinimumWindows=6.1", ""])
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("RMSKIN.ini", options.encode("ascii"))
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix in (".ini", ".inc"):
                inner = "\\".join(path.relative_to(source).parts)
                zf.write(path, f"Skins\\{SKIN_NAME}\\{inner}")
    size = out.stat().st_size
    with out.open("ab") as f:
        f.write(struct.pack("<qB7s", size, 0, b"RMSKIN\0"))
    return out


if __name__ == "__main__":          # make rmskin
    print(package(Path(sys.argv[1] if len(sys.argv) > 1 else "dist/DreamWindow.rmskin")))
