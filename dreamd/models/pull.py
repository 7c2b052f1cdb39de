"""`dreamd models pull`: one model from the Hugging Face hub into its standard cache, where
the diffusion backend finds it offline (backends/diffusion/locate.py). It says what it
needs before fetching anything, refuses when the disk lacks it, resumes an interrupted
file, and checks every file against the hub's listing (size, LFS sha256, git blob id).

The network is used here only; `dreamd run` never downloads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from dreamd.errors import ModelFetchError, UsageError
from dreamd.models.selection import RepoFile, Selection, choose, human

CHUNK = 8 << 20


@dataclass
class Pulled:
    repo_id: str
    commit: str
    selection: Selection
    snapshot: Path
    fetched: int            # bytes downloaded by this pull
    lines: list[str]        # the config lines that use it
    licence: str | None     # as the hub lists it (the model card's, else a license: tag)


def pull(repo_id: str, revision: str = "main", pick: str | None = None, *,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Pulled:
    from dreamd.backends.diffusion import locate

    _check_id(repo_id)
    cache = locate.hub_cache_dir()
    info = _model_info(repo_id, revision)
    files = [RepoFile(s.rfilename, s.lfs.size if s.lfs else (s.size or 0), s.blob_id,
                      s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
    index = None
    if pick is None and any(f.name == "model_index.json" for f in files):
        index = _model_index(repo_id, info.sha)
    selection = choose(repo_id, files, index, pick)
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    plan = _plan(selection, storage)
    free = _free(cache)
    what = ("a diffusers pipeline" + (", fp16 weights" if selection.variant else "")
            if selection.kind == "pipeline" else selection.main.name)
    resumed = f", {human(plan.partial)} of it already here" if plan.partial else ""
    count = len(selection.files)
    print(f"{repo_id} @ {info.sha[:10]} ({revision}): {what}; {count} "
          f"file{'s' if count != 1 else ''}, {human(selection.size)}; "
          f"to fetch {human(plan.missing)}{resumed}; {human(free)} free in {cache}",
          file=out, flush=True)
    need = plan.missing - plan.partial
    if need > free:
        raise UsageError(f"{repo_id} needs {human(need)} more in {cache}, whose disk has "
                         f"{human(free)} free: free some space, or set HF_HOME to a folder "
                         f"on a disk with room")
    fetched, checked = _fetch(repo_id, revision, info.sha, selection, storage, cache, plan,
                              out, err)
    snapshot = storage / "snapshots" / info.sha
    _verify(repo_id, selection, snapshot, skip=checked)
    lines = config_lines(repo_id, revision, selection, snapshot, cache)
    return Pulled(repo_id, info.sha, selection, snapshot, fetched, lines, _licence(info))


# ---------------------------------------------------------------- asking the hub

def _check_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(repo_id).expanduser().exists():
        raise UsageError(f"{repo_id} is a path on this machine: nothing to pull; set "
                         f"diffusion.model (or diffusion.lora) to it")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is not a hub id ({exc}); write it as org/name, "
                         f"e.g. stable-diffusion-v1-5/stable-diffusion-v1-5") from None
    if "/" not in repo_id:
        raise UsageError(f"{repo_id!r}: write a hub id as org/name, e.g. "
                         f"stable-diffusion-v1-5/stable-diffusion-v1-5")


def _hub_errors(repo_id: str, revision: str, exc: Exception) -> Exception:
    """One line for each way the hub can say no."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        return UsageError(f"{repo_id} is gated: accept its terms on {endpoint}/{repo_id} and "
                          f"log in with `hf auth login`")
    if isinstance(exc, RevisionNotFoundError):
        return UsageError(f"{repo_id} has no revision {revision!r} on {endpoint}")
    if isinstance(exc, RepositoryNotFoundError):
        return UsageError(f"no model {repo_id} on {endpoint} (a private one needs "
                          f"`hf auth login`)")
    if isinstance(exc, OfflineModeIsEnabled):
        return UsageError("HF_HUB_OFFLINE is set: unset it for `dreamd models pull` (the "
                          "only dreamd command that uses the network)")
    if isinstance(exc, HfHubHTTPError):
        return ModelFetchError(f"{endpoint} answered {exc.response.status_code} for "
                               f"{repo_id}: {str(exc).splitlines()[0]}")
    if isinstance(exc, httpx2.HTTPError):
        return ModelFetchError(f"cannot reach {endpoint} ({type(exc).__name__}: {exc}); "
                               f"check the network, or HF_ENDPOINT")
    if isinstance(exc, OSError):
        return ModelFetchError(f"{repo_id}: {str(exc).splitlines()[0]}")
    return exc


def _model_info(repo_id: str, revision: str):
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise _hub_errors(repo_id, revision, exc) from None
    if not info.sha or info.siblings is None:
        raise ModelFetchError(f"the hub's listing of {repo_id} has no commit or no files")
    return info


def _licence(info) -> str | None:
    card = getattr(info, "card_data", None)
    licence = card.get("license") if card is not None else None
    if licence == "other" and card.get("license_name"):
        licence = card.get("license_name")      # sd-turbo: other + sai-nc-community
    if not licence:
        licence = next((t.split(":", 1)[1] for t in info.tags or ()
                        if t.startswith("license:")), None)
    return str(licence) if licence else None


def _model_index(repo_id: str, commit: str) -> dict:
    """model_index.json read into memory (it names the components to fetch): nothing is
    written before the disk check."""
    import json

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    try:
        response = get_session().get(hf_hub_url(repo_id, "model_index.json", revision=commit),
                                     headers=build_hf_headers(), follow_redirects=True)
        hf_raise_for_status(response)
        return json.loads(response.content)
    except ValueError as exc:
        raise ModelFetchError(f"{repo_id}: model_index.json is not JSON ({exc})") from None
    except Exception as exc:
        raise _hub_errors(repo_id, commit, exc) from None


# ---------------------------------------------------------------- the disk

@dataclass
class Plan:
    missing: int            # bytes of the files not in the cache yet
    partial: int            # of which already on disk from an interrupted pull


def _blob(storage: Path, f: RepoFile) -> Path:
    return storage / "blobs" / (f.etag or "")


def _part(storage: Path, f: RepoFile) -> Path:
    # the name huggingface_hub gave partial blobs before 1.x, which its cache scan still
    # reports as an incomplete download (CachedIncompleteFileInfo)
    return storage / "blobs" / f"{f.etag}.incomplete"


def _plan(selection: Selection, storage: Path) -> Plan:
    missing = partial = 0
    for f in selection.files:
        if f.etag and _blob(storage, f).is_file():
            continue
        missing += f.size
        part = _part(storage, f)
        if f.sha256 and part.is_file() and part.stat().st_size <= f.size:
            partial += part.stat().st_size
    return Plan(missing, partial)


def _free(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or would: its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(Path.cwd()).free


# ---------------------------------------------------------------- fetching

class _Bar:
    """One progress bar over the bytes of the whole pull. huggingface_hub's http_get takes a
    tqdm-like class per file; ours feeds the one bar. Without a terminal, one line per file."""

    def __init__(self, total: int, initial: int, out: TextIO, err: TextIO):
        from tqdm import tqdm

        self.out = out
        self.tqdm = tqdm(total=total, initial=initial, unit="B", unit_scale=True,
                         unit_divisor=1000, file=err, dynamic_ncols=True,
                         disable=not _isatty(err), desc="pull")
        bar = self.tqdm

        class PerFile:
            def __init__(self, *args, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                bar.update(n)

            def close(self):
                pass

        self.per_file = PerFile

    def done(self, f: RepoFile, how: str) -> None:
        if self.tqdm.disable:
            print(f"  {how} {f.name} ({human(f.size)})", file=self.out, flush=True)

    def close(self) -> None:
        self.tqdm.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fetch(repo_id: str, revision: str, commit: str, selection: Selection, storage: Path,
           cache: Path, plan: Plan, out: TextIO, err: TextIO) -> tuple[int, set[str]]:
    """Every file into the cache; returns the bytes downloaded and the files whose sha256
    was checked on the way in."""
    from huggingface_hub import hf_hub_download

    bar = _Bar(plan.missing, plan.partial, out, err)
    fetched, checked = 0, set()
    try:
        for f in selection.files:
            had_blob = f.etag is not None and _blob(storage, f).is_file()
            if f.sha256 and not had_blob:
                got = _fetch_blob(repo_id, commit, f, storage, cache, bar)
                if got is not None:
                    fetched += got
                    checked.add(f.name)
            try:
                path = hf_hub_download(repo_id, f.name, revision=revision, cache_dir=cache,
                                       tqdm_class=bar.per_file)
            except Exception as exc:
                raise _hub_errors(repo_id, revision, exc) from None
            if Path(path).parent.parts[-1 - f.name.count("/")] != commit:
                raise ModelFetchError(f"{repo_id}: {revision} moved to another commit during "
                                      f"the pull; run the same command again")
            if not had_blob:
                fetched += 0 if f.sha256 else f.size
                bar.done(f, "fetched")
    except KeyboardInterrupt:
        bar.close()
        blobs = storage / "blobs"
        kept = sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0
        print(f"dreamd: interrupted; {human(kept)} of partial files kept in {blobs}: the "
              f"same command resumes", file=err, flush=True)
        raise
    bar.close()
    return fetched, checked


def _fetch_blob(repo_id: str, commit: str, f: RepoFile, storage: Path, cache: Path,
                bar: _Bar) -> int | None:
    """An LFS file into the cache's blobs/, resumed from what an earlier pull left.

    huggingface_hub 1.x and later resume only within one call (its retries after a dropped
    connection) and delete the partial file when the call fails (a per-process temporary
    name, huggingface_hub PR #4228), so a killed or Ctrl-C'd pull of a 2 GB UNet would start
    again from zero. This keeps the partial file under a stable name and asks for the rest
    with a Range request (http_get(resume_size=)); the blob enters the cache only once its
    sha256 is the hub's, and hf_hub_download then finds it and only links it."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    blob, part = _blob(storage, f), _part(storage, f)
    lock = cache / ".locks" / storage.name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.is_file():
            return None         # another pull fetched it meanwhile
        url = hf_hub_url(repo_id, f.name, revision=commit)
        try:
            meta = get_hf_file_metadata(url)
        except Exception as exc:
            raise _hub_errors(repo_id, commit, exc) from None
        if meta.etag != f.sha256:
            raise ModelFetchError(f"{repo_id}: {f.name}: the hub lists sha256 {f.sha256} but "
                                  f"serves {meta.etag}; run the same command again later")
        have = part.stat().st_size if part.is_file() else 0
        if have > f.size:
            part.unlink()
            have = 0
        headers = build_hf_headers()
        if _origin(meta.location) != _origin(url):
            headers.pop("authorization", None)      # a signed CDN URL: the token stays home
        try:
            with open(part, "r+b" if have else "wb") as out:
                out.seek(have)
                http_get(meta.location, out, resume_size=have, headers=headers,
                         expected_size=f.size, tqdm_class=bar.per_file)
        except KeyboardInterrupt:
            raise
        except OSError as exc:
            raise ModelFetchError(f"{repo_id}: {f.name}: {exc}; run the same command again "
                                  f"to resume") from None
        except Exception as exc:
            kept = part.stat().st_size if part.is_file() else 0
            raise ModelFetchError(f"{repo_id}: {f.name}: the download stopped "
                                  f"({type(exc).__name__}: {exc}); {human(kept)} kept, run the "
                                  f"same command again to resume") from None
        digest = _sha256(part)
        if digest != f.sha256:
            part.unlink()
            raise ModelFetchError(f"{repo_id}: {f.name}: sha256 {digest[:16]}… is not the "
                                  f"hub's {f.sha256[:16]}…: the download was corrupt and is "
                                  f"deleted; run the same command again")
        os.replace(part, blob)
    return f.size - have


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


# ---------------------------------------------------------------- checking

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_id(path: Path) -> str:
    """git's object id of a file: sha1 over "blob <size>\\0" and the content."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify(repo_id: str, selection: Selection, snapshot: Path, skip: set[str]) -> None:
    """Every file against the listing: its size, and its sha256 (LFS) or git blob id (the
    others); the files fetched just now had their sha256 checked before entering the cache.
    A file that does not match leaves the cache, so the next pull fetches it again."""
    for f in selection.files:
        path = snapshot / f.name
        problem = None
        if not path.is_file():
            problem = "missing from the cache after the download"
        elif path.stat().st_size != f.size:
            problem = f"{path.stat().st_size} bytes, the hub lists {f.size}"
        elif f.name not in skip:
            if f.sha256 and _sha256(path) != f.sha256:
                problem = f"its sha256 is not the hub's {f.sha256[:16]}…"
            elif not f.sha256 and f.blob_id and _git_blob_id(path) != f.blob_id:
                problem = f"its git blob id is not the hub's {f.blob_id[:12]}…"
        if problem:
            blob = path.resolve()
            path.unlink(missing_ok=True)
            if blob.parent.name == "blobs":
                blob.unlink(missing_ok=True)
            raise ModelFetchError(f"{repo_id}: {f.name}: {problem}; it was removed from the "
                                  f"cache: run the same command again")


# ---------------------------------------------------------------- using it

def config_lines(repo_id: str, revision: str, selection: Selection, snapshot: Path,
                 cache: Path) -> list[str]:
    """The [diffusion] lines that point at what was pulled: the hub id when locate.py finds
    exactly this model by it, else the path of the snapshot's file or folder."""
    from dreamd.backends.diffusion import locate
    from dreamd.errors import ModelError

    if selection.kind == "pipeline":
        key, target = "model", snapshot
    else:
        target = snapshot / selection.main.name
        key = "lora" if _is_lora(target) else "model"
    value = str(target)
    try:
        found = locate.locate(repo_id, what=key, key=f"diffusion.{key}", cache_dir=cache)
        if found.path.resolve() == target.resolve() or found.path == target:
            value = repo_id
    except ModelError:
        pass
    return ["[diffusion]", f'{key} = "{_toml_escape(value)}"']


def _is_lora(path: Path) -> bool:
    from dreamd.backends.diffusion import locate
    from dreamd.errors import ModelError

    if path.suffix.lower() != ".safetensors":
        return False
    try:
        table = locate.read_header(path)
    except ModelError:
        return False
    return any("lora" in k.lower() for k in table)


def _toml_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
