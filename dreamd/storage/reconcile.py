"""Reconcile at start: make the files on disk and the ledger's rows agree, without
ever mass-deleting.

Files before rows means a crash can leave a file no row names (an interrupted write,
a retention pass killed between its rows and its files): a few such orphans are
deleted. When most of what is on disk is unknown to the ledger (a deleted or replaced
ledger, a data dir from an old version, a ledger from another data dir), the files are
moved aside into `orphaned-<date>/`, never deleted, and the log says so plainly.

The data dir has an identity (`.dreamd-id`, also kept in `runtime_state.data_dir_id`):
files from another ledger are never taken for this ledger's own, even when their names
happen to match (frame and keyframe names repeat from run to run).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy import bindparam, select, text, update

from dreamd.ledger import queries, transitions
from dreamd.ledger.models import Frame, Keyframe, RuntimeState, utcnow
from dreamd.storage.files import is_temp
from dreamd.storage.paths import resolve, stored
from dreamd.storage.space import ORPHANED_PREFIX

log = logging.getLogger("dreamd.storage")
FR, KF, RT = Frame.__table__, Keyframe.__table__, RuntimeState.__table__
ID_FILE = ".dreamd-id"
# Folders whose files rows name (latents/ is a cache: retention handles it).
NAMED = ("frames", "keyframes", "injections", "thumbs")
ORPHANS_DELETED_MAX = 64        # more unknown files than this (and than 5 % of the known)
ORPHANS_DELETED_SHARE = 0.05    # are moved aside instead of deleted
IMAGE_MISSING = "image missing at start"   # keyframes.error of an image that vanished


def known_files(conn, data_dir: Path) -> set[Path]:
    """Every file a row names under the data dir (live or history)."""
    values = conn.execute(text(
        "SELECT path FROM frames WHERE state IN ('ready','shown') UNION ALL "
        "SELECT path FROM keyframes WHERE path IS NOT NULL AND pruned_at IS NULL UNION ALL "
        "SELECT thumb_path FROM keyframes WHERE thumb_path IS NOT NULL UNION ALL "
        "SELECT input_path FROM keyframes WHERE source = 'injection' "
        "AND input_path IS NOT NULL")).scalars()
    return {resolve(data_dir, v) for v in values if v}


def retired_files(conn, data_dir: Path, files: list[Path]) -> set[Path]:
    """Those of `files` that rows name as gone: evicted frames, pruned keyframe images,
    blends of keyframes no longer pending."""
    out: set[Path] = set()
    values = [stored(data_dir, f) for f in files]
    for i in range(0, len(values), 500):
        chunk = values[i:i + 500]
        q = text("SELECT path FROM frames WHERE state = 'evicted' AND path IN :v UNION ALL "
                 "SELECT path FROM keyframes WHERE pruned_at IS NOT NULL AND path IN :v "
                 "UNION ALL SELECT input_path FROM keyframes WHERE source = 'injection' "
                 "AND state NOT IN ('available','executing','retryable') "
                 "AND input_path IN :v").bindparams(bindparam("v", expanding=True))
        out.update(resolve(data_dir, p) for p in conn.execute(q, {"v": chunk}).scalars())
    return out


def _identity(ctx) -> tuple[str, bool]:
    """This data dir's id, and whether the ledger and the files disagree about it."""
    data_dir = ctx.cfg.data_dir
    marker = data_dir / ID_FILE
    try:
        on_disk = marker.read_text().strip() or None
    except FileNotFoundError:
        on_disk = None
    with ctx.reader.connect() as conn:
        in_ledger = conn.execute(select(RT.c.data_dir_id).where(RT.c.id == 1)).scalar()
    mismatch = on_disk is not None and on_disk != in_ledger
    # the ledger's own id wins; the file's only when the two agree (or the ledger has none
    # yet and nothing disagrees); a fresh one when neither can be trusted
    ident = in_ledger or (None if mismatch else on_disk) or str(uuid.uuid4())
    if mismatch:
        why = ("this ledger was made elsewhere (data dir id " + in_ledger + ")"
               if in_ledger else "the ledger was replaced or deleted")
        log.warning("%s: the files here belong to data dir id %s, but %s", data_dir, on_disk, why)
    return ident, mismatch


def _write_identity(ctx, ident: str) -> None:
    marker = ctx.cfg.data_dir / ID_FILE
    if not marker.exists() or marker.read_text().strip() != ident:
        from dreamd.storage.files import write_atomic
        write_atomic(marker, (ident + "\n").encode(), fsync=True)
    with ctx.engine.begin() as conn:
        queries.update_runtime(conn, data_dir_id=ident)


def move_aside(data_dir: Path, files: list[Path]) -> Path:
    """Move files into orphaned-<date>/<folder>/, keeping their names. Nothing is deleted."""
    dest = data_dir / f"{ORPHANED_PREFIX}{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for f in files:
        target = dest / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(target))
    return dest


def reconcile(ctx) -> dict[str, int]:
    """At start, with no worker running yet. Returns what it did, by kind."""
    data_dir = ctx.cfg.data_dir
    stats = {"rows_missing_file": 0, "keyframe_files_missing": 0, "retired_files": 0,
             "orphan_files": 0, "moved_aside": 0, "temp_files": 0}
    ident, mismatch = _identity(ctx)

    with ctx.reader.connect() as conn:
        known = set() if mismatch else known_files(conn, data_dir)
    unknown: list[Path] = []
    n_files = 0
    for name in NAMED:
        folder = data_dir / name
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if not f.is_file():
                continue
            if is_temp(f):
                f.unlink(missing_ok=True)
                stats["temp_files"] += 1
                continue
            n_files += 1
            if f not in known:
                unknown.append(f)
    if unknown and not mismatch:
        # named by rows that say the file should be gone (a retention pass killed between
        # its rows and its files): the ledger's own garbage, deleted whatever the count
        with ctx.reader.connect() as conn:
            garbage = retired_files(conn, data_dir, unknown)
        for f in garbage:
            f.unlink(missing_ok=True)
        stats["retired_files"] = len(garbage)
        unknown = [f for f in unknown if f not in garbage]
    if unknown:
        few = (len(unknown) <= ORPHANS_DELETED_MAX
               or len(unknown) <= ORPHANS_DELETED_SHARE * n_files)
        if few and not mismatch:
            for f in unknown:
                f.unlink(missing_ok=True)
            stats["orphan_files"] = len(unknown)
        else:
            dest = move_aside(data_dir, unknown)
            stats["moved_aside"] = len(unknown)
            log.warning("%d of the %d files in %s are not this ledger's (%s): moved them "
                        "aside to %s, nothing was deleted. Look at them, then delete that "
                        "folder (or put back the ledger they belong to).", len(unknown),
                        n_files, data_dir,
                        "a ledger from another data dir, or a replaced one" if mismatch
                        else "a deleted or replaced ledger, or an older dreamd", dest)
    _write_identity(ctx, ident)

    # rows whose files are gone: live frames are evicted, keyframe images marked pruned
    with ctx.reader.connect() as conn:
        live = conn.execute(select(FR.c.id, FR.c.path, FR.c.state)
                            .where(FR.c.state.in_(("ready", "shown")))).all()
        images = conn.execute(select(KF.c.id, KF.c.path, KF.c.thumb_path)
                              .where(KF.c.path.is_not(None), KF.c.pruned_at.is_(None))).all()
        thumbs = conn.execute(select(KF.c.id, KF.c.thumb_path)
                              .where(KF.c.thumb_path.is_not(None))).all()
    missing = [r for r in live if not resolve(data_dir, r.path).exists()]
    gone = [r for r in images if not resolve(data_dir, r.path).exists()]
    lost_thumbs = [r.id for r in thumbs if not resolve(data_dir, r.thumb_path).exists()]
    if missing or gone or lost_thumbs:
        now = utcnow()
        with ctx.engine.begin() as conn:
            for r in missing:
                transitions.transition(conn, "frame", r.id, r.state, "evicted", worker="startup",
                                       now=now, values={"evicted_at": now},
                                       detail="file missing at start")
            if gone:    # said in the row: retention did not prune these, they vanished
                conn.execute(update(KF).where(KF.c.id.in_([r.id for r in gone]))
                             .values(pruned_at=now, error=IMAGE_MISSING))
            if lost_thumbs:
                conn.execute(update(KF).where(KF.c.id.in_(lost_thumbs)).values(thumb_path=None))
        stats["rows_missing_file"] = len(missing)
        stats["keyframe_files_missing"] = len(gone)
    # temp files of atomic writes elsewhere under the data dir (latents, output)
    for folder in (data_dir / "latents", ctx.cfg.output_dir):
        if folder.is_dir():
            for f in folder.iterdir():
                if is_temp(f):
                    f.unlink(missing_ok=True)
                    stats["temp_files"] += 1
    if any(stats.values()):
        log.warning("reconciled files with the ledger: %s",
                    ", ".join(f"{k} {v}" for k, v in stats.items() if v))
    return stats
