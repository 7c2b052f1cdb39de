"""ComfyUI's own folders, kept bounded. ComfyUI has no endpoint that deletes a file, so
what a keyframe leaves on the server (its input upload, its PreviewImage in temp/ or a
user workflow's SaveImage in output/) can only be removed where the daemon can reach the
folders: a ComfyUI it supervises (the folders from its command line) or whose folder
`comfyui.models_dir` names (its parent). There a keyframe's files go once the keyframe
is completed in the ledger, and only when their bytes are the ones dreamd uploaded or
fetched; and what earlier versions left (output/dreamd/keyframe_NNNNN_.png, content-named
uploads in input/<upload_subfolder>/) is swept once. A remote server is explained by
`dreamd doctor` (dreamd/backends/comfyui/doctor.py).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("dreamd.comfyui")

KINDS = ("input", "output", "temp")
# What earlier versions of dreamd named on the server (and nothing else is touched):
# uploads named by content (client.content_name, and ComfyUI's " (1)" when it renamed
# one), and the shipped workflows' SaveImage outputs under output/dreamd/.
OLD_INPUT = re.compile(r"dreamd_[0-9a-f]{16}(?: \(\d+\))?\.png")
OLD_OUTPUT = re.compile(r"(?:keyframe|seed)_\d{5}_\.png")
OLD_OUTPUT_SUBFOLDER = "dreamd"
SWEPT_MARKER = "comfyui-swept"      # in the data dir: the sweep ran for these folders


@dataclass(frozen=True)
class ComfyFolders:
    """Where one ComfyUI keeps its input/, output/ and temp/ folders."""

    input: Path
    output: Path
    temp: Path
    source: str               # how they were found, for the log and doctor

    def path(self, kind: str, subfolder: str, name: str) -> Path | None:
        """The file a server's (type, subfolder, filename) names, or None when it would
        leave its folder (a name the server made up must never reach elsewhere)."""
        if kind not in KINDS:
            return None
        base = getattr(self, kind).resolve()
        path = base.joinpath(*[p for p in subfolder.split("/") if p], name).resolve()
        return path if path.is_relative_to(base) and path != base else None


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def from_command(argv: list[str], cwd: Path) -> ComfyFolders | None:
    """The folders of a ComfyUI started by `argv` in `cwd`, as its main.py sets them:
    --base-directory B (B/input, B/output, B/temp), else main.py's own directory;
    --input-directory and --output-directory name the folder itself, --temp-directory
    the parent of its temp/."""
    main = next((a for a in argv if Path(a).name == "main.py"), None)
    base_flag = _flag(argv, "--base-directory")
    if base_flag is None and main is None:
        return None
    base = cwd / (base_flag if base_flag is not None else Path(main).parent)   # type: ignore[arg-type]
    found = {k: base / k for k in KINDS}
    for kind in ("input", "output"):
        given = _flag(argv, f"--{kind}-directory")
        if given:
            found[kind] = cwd / given
    temp = _flag(argv, "--temp-directory")
    if temp:
        found["temp"] = cwd / temp / "temp"
    return ComfyFolders(found["input"], found["output"], found["temp"],
                        f"the command that starts it ({' '.join(argv[:3])}…)")


def from_models_dir(models_dir: Path) -> ComfyFolders | None:
    """A ComfyUI tree: the parent of its models/ holds input/ or output/."""
    root = models_dir.parent
    if not ((root / "input").is_dir() or (root / "output").is_dir()):
        return None
    return ComfyFolders(root / "input", root / "output", root / "temp",
                        f"comfyui.models_dir ({models_dir})")


def locate(cfg) -> ComfyFolders | None:
    """The folders of the ComfyUI the config names: the supervised one first (its command
    line is the truth), else the tree comfyui.models_dir sits in."""
    c = cfg.comfyui
    if c.start_argv or c.start_command:
        argv = list(c.start_argv) if c.start_argv else shlex.split(c.start_command,
                                                                   posix=_posix())
        found = from_command(argv, Path(c.start_cwd or ".").resolve())
        if found is not None:
            return found
    if c.models_dir:
        return from_models_dir(Path(c.models_dir))
    return None


def _posix() -> bool:
    import os
    return os.name != "nt"


def is_local(url: str) -> bool:
    """A server on this machine: the only kind whose folders a local path can name."""
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0") or host.startswith("127.") \
        or host == socket.gethostname().lower()


def remove_if_same(path: Path | None, sha256: str | None) -> bool:
    """Delete `path` when its bytes hash to `sha256` (what dreamd uploaded or fetched):
    a file someone else put there, or rewrote since, stays."""
    if path is None or not sha256:
        return False
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            return False
        path.unlink()
        return True
    except OSError:          # gone already, or held open by ComfyUI on Windows: next time
        return False


def leftovers(info: dict) -> list[tuple[str, str, str, str | None]]:
    """(type, subfolder, filename, sha256) of the files a keyframe's result left on the
    server: its output image and its uploaded input."""
    out = []
    rel = str(info.get("output") or "")
    if rel:
        sub, _, name = rel.rpartition("/")
        out.append((info.get("output_type") or "output", sub, name, info.get("output_sha256")))
    upload = info.get("upload")
    if upload:
        sub, _, name = str(upload).rpartition("/")
        out.append(("input", sub, name, info.get("upload_sha256")))
    return out


def sweep_old(folders: ComfyFolders, upload_subfolder: str) -> int:
    """Remove what earlier dreamd versions left: content-named uploads in
    input/<upload_subfolder>/ and keyframe_/seed_ outputs in output/dreamd/. Only those
    names; a user's own files in the same folders stay."""
    removed = 0
    for folder, pattern in ((folders.path("input", upload_subfolder, "x"), OLD_INPUT),
                            (folders.path("output", OLD_OUTPUT_SUBFOLDER, "x"), OLD_OUTPUT)):
        if folder is None or not folder.parent.is_dir():
            continue
        for path in folder.parent.iterdir():
            if path.is_file() and pattern.fullmatch(path.name):
                try:
                    path.unlink()
                    removed += 1
                except OSError:
                    pass
    return removed


def sweep_once(folders: ComfyFolders, upload_subfolder: str, data_dir: Path) -> int:
    """`sweep_old`, once per data dir and set of folders (a marker in the data dir)."""
    marker = Path(data_dir) / SWEPT_MARKER
    key = f"{folders.input.resolve()}\n{folders.output.resolve()}\n"
    try:
        if key in marker.read_text(encoding="utf-8"):
            return 0
    except OSError:
        pass
    removed = sweep_old(folders, upload_subfolder)
    if removed:
        log.info("removed %d file(s) earlier versions of dreamd left in ComfyUI's folders "
                 "(%s, %s)", removed, folders.input, folders.output)
    try:
        with open(marker, "a", encoding="utf-8") as fh:
            fh.write(key)
    except OSError:
        pass
    return removed


class Tidy:
    """The daemon's side: each keyframe's files on the server, removed once the ledger
    has the keyframe completed (or given up: discarded, cancelled). Until then a retry
    may fetch the same output again (re-attach), so they stay."""

    KEPT = 64          # keyframes waiting at most (a ledger that cannot be read: oldest go)

    def __init__(self, folders: ComfyFolders, urls: list[str], state_of) -> None:
        self.folders = folders
        self.urls = {u for u in urls if is_local(u)}
        # (chain index, prompt_id) -> the keyframe's state in the ledger, or None
        self.state_of = state_of
        self.pending: list[tuple[int, str, list[tuple[str, str, str, str | None]]]] = []
        self.removed = 0

    def add(self, info: dict, chain_index: int) -> None:
        if info.get("server") in self.urls and info.get("prompt_id"):
            self.pending.append((chain_index, info["prompt_id"], leftovers(info)))
            del self.pending[:-self.KEPT]

    def tidy(self, inputs: bool = True) -> int:
        """Remove the files of every keyframe now safe in the ledger; returns how many.
        `inputs=False` while a keyframe is being made: its upload may have just replaced
        an input slot's file, which must not go between the upload and ComfyUI's read
        (the bytes check would pass a moment before the overwrite). Those wait for a
        pause between keyframes, or the stop; outputs never share a name in use."""
        keep, removed = [], 0
        for chain_index, prompt_id, files in self.pending:
            try:
                state = self.state_of(chain_index, prompt_id)
            except Exception:          # the ledger is busy: ask again next time
                keep.append((chain_index, prompt_id, files))
                continue
            if state in ("available", "executing", "retryable"):
                keep.append((chain_index, prompt_id, files))
                continue
            later = [f for f in files if f[0] == "input" and not inputs]
            for kind, sub, name, sha in files:
                if (kind, sub, name, sha) not in later:
                    removed += remove_if_same(self.folders.path(kind, sub, name), sha)
            if later:
                keep.append((chain_index, prompt_id, later))
        self.pending = keep
        self.removed += removed
        return removed


def describe(cfg) -> tuple[str, str]:
    """`dreamd doctor`: what the daemon leaves in each server's folders, and how it is
    bounded there (or how to bound it)."""
    from dreamd.backends.comfyui.workflow import load_workflow

    c = cfg.comfyui
    found = locate(cfg)
    saves = []
    for name in (c.workflow, c.txt2img_workflow):
        try:
            wf, _ = load_workflow(name)
        except Exception:         # the backend check reports a workflow that does not load
            continue
        if any(n.get("class_type") == "SaveImage" for n in wf.values()):
            saves.append(str(name))
    lines, verdict = [], "ok"
    inputs = (f"its input/{c.upload_subfolder}/ holds at most 2 uploads of this data dir "
              f"(overwritten by each keyframe)")
    kept = ("each keyframe also stays in its output/ (the workflow ends in SaveImage: "
            "PreviewImage writes to temp/ instead)" if saves else
            "each keyframe leaves one PNG in its temp/, which ComfyUI empties only when it "
            "starts")
    for url in (u.rstrip("/") for u in c.urls):
        if found is not None and is_local(url):
            lines.append(f"{url}: folders known from {found.source}: {inputs}; each "
                         f"keyframe's files are removed there once it is in the ledger")
            continue
        if saves:
            verdict = "warning"
        how = ("restart it now and then" if not saves else
               "use a workflow that ends in PreviewImage, and restart it now and then")
        local = (" or set comfyui.models_dir to its models folder (dreamd then removes "
                 "them)" if is_local(url) else "")
        lines.append(f"{url}: dreamd cannot reach its folders; {inputs}, but {kept}: "
                     f"{how}{local}")
    return verdict, "; ".join(lines)
