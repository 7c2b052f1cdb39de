"""The `dreamd` command. Each subcommand imports only what it needs: the commands that
do not compute images (status, pause, sql, history, config, db…) never import torch,
so they answer in well under a second (tests/test_cli_imports.py checks it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from dreamd import __version__
from dreamd.errors import ConfigError, DreamdError, LedgerUnusableError, UsageError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _config(args: argparse.Namespace):
    from dreamd import config
    cfg = config.load(args.config, args.data_dir)
    args.ledger_path = cfg.db_path      # named by main() when the file turns out unusable
    return cfg


# ---------------------------------------------------------------- commands

def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.backend:
        cfg.generation.backend = args.backend
        cfg.sources["generation.backend"] = "--backend"
    from dreamd.daemon import run
    return run(cfg, duration=args.duration)


def cmd_status(args: argparse.Namespace) -> int:
    # the read model (sqlite3 alone: SQLAlchemy's import was most of a slow status)
    from dreamd.ledger import read_model

    cfg = _config(args)
    if cfg.db_path.exists():
        conn = read_model.connect(cfg.db_path)
        try:
            conn.execute("BEGIN")           # one consistent read
            found = read_model.status(conn, cfg)
        finally:
            conn.close()
    else:
        found = read_model.status(None, cfg)
    report: dict[str, Any] = {
        "data_dir": str(cfg.data_dir), "database": str(cfg.db_path),
        "revision": found.revision, "head": read_model.head_revision(), **found.as_json()}
    report["storage"] = _storage_report(cfg, found)
    from dreamd.web.server import running_url      # the viewer the live daemon serves
    run = found.last_run or {}
    report["web_url"] = running_url(cfg.data_dir, run.get("pid")) if found.daemon.alive else None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    from dreamd.cli.status import print_status
    print_status(report)
    return 0


def _storage_report(cfg, found) -> dict[str, Any]:
    """The data dir's size by part: while a daemon runs, as its janitor last measured
    it (walking a big data dir was a good part of a slow `dreamd status`), else measured
    now; and what the daemon said about the free-space floor (a stopped one pauses
    nothing)."""
    from dreamd.storage import space

    recorded = found.storage_recorded or {}
    if found.daemon.alive and "parts" in recorded:
        return {**recorded, "measured": "by the daemon"}
    s = cfg.storage
    usage = space.measure(cfg.data_dir, budget_gb=s.budget_gb, floor_gb=s.min_free_gb)
    return {**usage.as_dict(), "low": None}


def cmd_config_show(args: argparse.Namespace) -> int:
    from dreamd import config

    cfg = _config(args)
    where, how = (str(cfg.file), "") if cfg.file else ("(none)", "")
    print(f"# config file: {where}{how}")
    print(f"# data dir:    {cfg.data_dir}  ({cfg.sources.get('system.data_dir')})")
    try:
        bad = _stored_knobs(cfg)
    except Exception as exc:
        # the config is worth seeing even when the ledger is not readable: say why not
        from dreamd.ledger.unusable import explain

        problem = explain(exc, cfg.db_path)
        if problem is None:
            raise
        bad = {}
        print(f"dreamd: stored knobs not read: {problem}", file=sys.stderr)
    for key, why in bad.items():
        print(f"# stored knob {key} is invalid ({why}): the next start drops it; "
              f"`dreamd set --reset {key}` clears it")
    print(config.to_toml(cfg), end="")
    return 0


def _stored_knobs(cfg) -> dict[str, str]:
    """Put the knobs `dreamd set` stored in the ledger (and those sent but not applied
    yet) over the file's values, naming their source; return the invalid ones."""
    from dreamd.ledger import database
    from dreamd.ledger.controls import overrides

    if database.current_revision(cfg.db_path) is None:
        return {}
    engine = database.reader(cfg.db_path, pool=False)
    try:
        with engine.connect() as conn:
            knobs, bad = overrides(conn)
    finally:
        engine.dispose()
    for key, (value, how) in knobs.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        cfg.sources[key] = f"{how} (over {cfg.sources.get(key, 'default')})"
    return bad


def cmd_models_pull(args: argparse.Namespace) -> int:
    from dreamd.models.command import pull
    return pull(args)


def cmd_models_list(args: argparse.Namespace) -> int:
    from dreamd.models.command import list_models
    return list_models(_config(args), args)


def cmd_config_check(args: argparse.Namespace) -> int:
    from dreamd import config

    config.check_file(args.file)
    print(f"{args.file}: ok")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from dreamd.ledger import database

    cfg = _config(args)
    before = database.current_revision(cfg.db_path)
    _migrate(cfg.db_path, "upgrade", args.revision)
    after = database.current_revision(cfg.db_path)
    print(f"{cfg.db_path}: {before or 'empty'} -> {after}")
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from dreamd.ledger import database

    cfg = _config(args)
    if _empties(database.current_revision(cfg.db_path), args.revision) and not args.yes:
        _confirm(f"dreamd db downgrade {args.revision} empties the ledger {cfg.db_path}: "
                 f"every keyframe, frame and control row is dropped",
                 f"db downgrade {args.revision} empties the ledger {cfg.db_path}: add --yes "
                 f"to do it without a terminal (nothing changed)")
    _migrate(cfg.db_path, "downgrade", args.revision)
    print(f"{cfg.db_path}: now at {database.current_revision(cfg.db_path) or 'base'}")
    return 0


def _migrate(db_path, direction: str, revision: str) -> None:
    """Alembic's upgrade or downgrade, its errors (an unknown revision) as one line."""
    from alembic.util import CommandError

    from dreamd.ledger import database

    try:
        getattr(database, direction)(db_path, revision)
    except CommandError as exc:
        raise UsageError(f"{db_path}: cannot {direction} to {revision!r}: {exc} (the "
                         f"revisions are listed by `dreamd db history`; nothing changed)") \
            from None


def _empties(current: str | None, target: str) -> bool:
    """Does downgrading from `current` to `target` drop the whole schema?"""
    from dreamd.ledger import database

    if current is None:
        return False
    if target == "base":
        return True
    if target.startswith("-") and target[1:].isdigit():
        order = [rev for rev, _, _ in database.revisions()]
        return current in order and int(target[1:]) > order.index(current)
    return False


def _confirm(question: str, refusal: str) -> None:
    """Ask on a terminal (typing `yes` goes on); without one, refuse with `refusal`."""
    if not sys.stdin or not sys.stdin.isatty():
        raise UsageError(refusal)
    print(f"{question}. Type yes to go on: ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() != "yes":
        raise UsageError("not confirmed: nothing changed")


def cmd_db_current(args: argparse.Namespace) -> int:
    from dreamd.ledger import database

    cfg = _config(args)
    current, head = database.current_revision(cfg.db_path), database.head_revision()
    note = "(head)" if current == head else f"(head is {head}; run `dreamd db upgrade`)"
    print(f"{current or 'none'} {note}")
    return 0


def cmd_db_history(args: argparse.Namespace) -> int:
    from dreamd.ledger import database

    for rev, down, doc in database.revisions():
        first = (doc or "").splitlines()[0] if doc else ""
        print(f"{down or 'base'} -> {rev}  {first}")
    return 0


def _ledger_writer(cfg):
    from dreamd.ledger import database

    if database.current_revision(cfg.db_path) is None:
        from dreamd.errors import LedgerError
        raise LedgerError(f"no ledger at {cfg.db_path} yet: start the daemon (`dreamd run`) "
                          f"or run `dreamd db upgrade`")
    return database.writer(cfg.db_path, pool=False)


def _control(args: argparse.Namespace, command: str, payload: dict[str, Any]) -> int:
    from dreamd.ledger import queries
    from dreamd.ledger.controls import request

    cfg = _config(args)
    engine = _ledger_writer(cfg)
    try:
        with engine.begin() as conn:
            cid = request(conn, command, payload)
            alive = queries.run_alive(queries.last_run(conn))
    finally:
        engine.dispose()
    when = "the daemon applies it within a second" if alive else \
        "no daemon is running: it is applied when one starts"
    print(f"control {cid}: {command} {json.dumps(payload) if payload else ''}".rstrip()
          + f" ({when})")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _control(args, "pause", {"reason": args.reason} if args.reason else {})


def cmd_resume(args: argparse.Namespace) -> int:
    return _control(args, "resume", {})


def cmd_set(args: argparse.Namespace) -> int:
    from dreamd.ledger.controls import validate_knob, validate_reset

    if args.reset:
        if args.assignment:
            raise UsageError("give KEY=VALUE or --reset KEY, not both")
        return _control(args, "set", {"reset": validate_reset(args.reset)})
    if not args.assignment or "=" not in args.assignment:
        raise UsageError(f"{args.assignment or 'nothing'}: expected KEY=VALUE, e.g. "
                         f"generation.denoise=0.4 (or --reset KEY)")
    key, value = (x.strip() for x in args.assignment.split("=", 1))
    validate_knob(key, value)          # the same check the daemon makes, but now
    return _control(args, "set", {"key": key, "value": value})


def cmd_theme(args: argparse.Namespace) -> int:
    cfg = _config(args)
    names = [t.name for t in cfg.prompts.themes]
    if args.name not in ("next", *names):
        raise ConfigError(f"no theme named {args.name!r}: themes are {', '.join(names)} "
                          f"(or next)")
    return _control(args, "theme", {"name": args.name})


def cmd_free(args: argparse.Namespace) -> int:
    code = _control(args, "free", {})
    note = _free_note(_config(args))
    if note:
        print(note)
    return code


def _free_note(cfg) -> str | None:
    """While the daemon generates, a free lasts until the next keyframe loads the model
    again (seconds on ComfyUI): say so, and how to keep the memory free."""
    from sqlalchemy import select

    from dreamd.ledger import queries
    from dreamd.ledger.models import RuntimeState
    engine = _reader(cfg)
    try:
        with engine.connect() as conn:
            alive = queries.run_alive(queries.last_run(conn))
            t = RuntimeState.__table__
            paused = conn.execute(select(t.c.paused).where(t.c.id == 1)).scalar()
    finally:
        engine.dispose()
    if paused or cfg.generation.backend != "comfyui":
        return None
    if not alive:
        return ("note: applied when the daemon starts, it frees only until the first keyframe "
                "loads the model again; `dreamd pause` first to keep the memory free")
    return ("note: the dream is generating, so the next keyframe loads the model again "
            "within seconds; to keep the memory free, `dreamd pause` first (then `dreamd "
            "free`; `dreamd resume` when done)")


def cmd_inject(args: argparse.Namespace) -> int:
    return _control(args, "inject", {})


def cmd_stop(args: argparse.Namespace) -> int:
    from dreamd.cli.stop import stop
    return stop(_config(args), args.timeout)


def cmd_tui(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from dreamd.tui.app import run
    return run(cfg, graphics=args.graphics)


def cmd_export(args: argparse.Namespace) -> int:
    from dreamd.export.command import export
    return export(_config(args), args)


def cmd_open(args: argparse.Namespace) -> int:
    import webbrowser

    from dreamd.errors import DaemonError
    from dreamd.web.server import live_url

    cfg = _config(args)
    url = live_url(cfg)
    if url is None:
        raise DaemonError(f"no web viewer is running for {cfg.data_dir}: start the daemon "
                          f"(`dreamd run`; the viewer is on unless web.enabled = false)")
    url += "?kiosk=1" if args.kiosk else ""
    print(url)
    if not webbrowser.open(url):
        raise DaemonError(f"no browser could be started here: open {url} yourself")
    return 0


def _reader(cfg):
    from dreamd.ledger import database
    return database.reader(cfg.db_path)


def cmd_history(args: argparse.Namespace) -> int:
    from sqlalchemy import text

    cfg = _config(args)
    engine = _reader(cfg)
    try:
        with engine.connect() as conn:
            # the newest n (0 = all) created since --since, shown oldest first
            limit = args.limit if args.limit is not None else (0 if args.since else 20)
            result = conn.execute(text(
                "SELECT chain_index AS keyframe, state, theme, attempt, "
                "ROUND(generation_ms) AS ms, created_at, completed_at FROM keyframe_timing "
                "WHERE created_at >= :since ORDER BY chain_index DESC LIMIT :n"),
                {"n": limit or -1, "since": args.since or ""})
            rows = result.all()
            columns = list(result.keys())
    finally:
        engine.dispose()
    from dreamd.ledger.sql import write
    write(columns, reversed(rows), args.format, sys.stdout, max_rows=0)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import sqlite3

    from dreamd.ledger.sql import TIMEOUT_SECONDS, Shell, statements, write

    cfg = _config(args)
    if not cfg.db_path.exists():
        from dreamd.errors import LedgerError
        raise LedgerError(f"no ledger at {cfg.db_path} yet: start the daemon first")
    shell = Shell(cfg.db_path)
    worst = 0
    try:
        if args.query:      # one argument may hold several statements, like stdin
            queries: Any = list(statements([args.query]))
        else:
            if sys.stdin.isatty():
                print(f"read-only SQL on {cfg.db_path}; end each statement with ';', "
                      f"Ctrl-D to leave. Tables: keyframes, interpolations, frames, "
                      f"embeddings, injections, controls, transitions, daemon_runs, "
                      f"runtime_state; views: frame_history, keyframe_timing, injection_log")
            queries = statements(sys.stdin)
        for q in queries:
            try:
                columns, rows = shell.execute(
                    q, timeout=TIMEOUT_SECONDS if args.timeout is None else args.timeout)
                if columns:
                    write(columns, rows, args.format, sys.stdout, max_rows=args.max_rows,
                          notes=sys.stderr)
                else:
                    for _ in rows:      # a statement without columns: run it to the end
                        pass
            except (sqlite3.Error, UsageError) as exc:
                print(f"dreamd sql: {exc}" if isinstance(exc, sqlite3.Error) else str(exc),
                      file=sys.stderr)
                code = EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
                if args.query:
                    return code
                worst = max(worst, code)
            sys.stdout.flush()
    finally:
        shell.close()
    return worst


def cmd_stats(args: argparse.Namespace) -> int:
    from dreamd.ledger import database, queries
    from dreamd.memory import stats
    from dreamd.quality import report as quality

    cfg = _config(args)
    if database.current_revision(cfg.db_path) is None:
        print(f"no ledger at {cfg.db_path} yet: nothing to report (start the daemon first)")
        return 0
    window = args.window or cfg.cache.collapse_window
    engine = _reader(cfg)
    try:
        with engine.connect() as conn:
            report = stats.collect(conn, window=window, model=args.model, cache=cfg.cache)
            report["quality"] = quality.collect(queries.dbapi(conn), cfg)
    finally:
        engine.dispose()
    print(stats.as_json(report) if args.json
          else "\n".join([stats.render(report), *quality.lines(report["quality"])]))
    if args.plot:
        from dreamd.quality.plot import draw     # matplotlib: only when asked
        draw(cfg, args.plot, window=window, model=report["model"],
             collapse=report["similarity"]["collapse_threshold"])
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_seeds(args: argparse.Namespace) -> int:
    from dreamd.seeding import write_seeds

    cfg = _config(args)
    folder = args.dir or cfg.seed_dirs()[-1]
    w, h = cfg.generation.resolution
    for path in write_seeds(folder, args.count, width=w, height=h):
        print(path)
    return 0


def cmd_rainmeter_install(args: argparse.Namespace) -> int:
    from dreamd.rainmeter import run_install
    return run_install(_config(args), args.skins_dir, autostart=not args.no_autostart)


def cmd_doctor(args: argparse.Namespace) -> int:
    from dreamd.doctor import diagnose, print_report

    rows = diagnose(_config(args))
    if args.json:
        print(json.dumps([{"check": n, "verdict": v, "detail": d} for n, v, d in rows],
                         indent=2))
    else:
        print_report(rows)
    return EXIT_ERROR if any(v == "problem" for _, v, _ in rows) else 0


# ---------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse that suggests the command meant, like the config file does for keys
    (Python 3.11's says only "invalid choice"); sub-commands inherit the class."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            names = [str(c) for c in action.choices]
            hint = _near(str(value), names)
            if hint:
                raise argparse.ArgumentError(
                    action, f"invalid choice: {value!r}; did you mean "
                            f"{' or '.join(map(repr, hint))}? (choose from {', '.join(names)})")
        super()._check_value(action, value)


def _near(word: str, names: list[str]) -> list[str]:
    """The names one or two typos away (a swap of neighbours is one typo: `stauts` is
    as near `status` as `stats`, which difflib's ratio does not see), nearest first."""
    def typos(a: str, b: str) -> int:             # optimal string alignment distance
        d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,
                              d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
                if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                    d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
        return d[-1][-1]

    limit = 1 if len(word) <= 4 else 2
    scored = sorted((typos(word, n), abs(len(n) - len(word)), n) for n in names)
    best = [s for s in scored if s[0] <= limit]
    return [n for t, _, n in best if t == best[0][0]][:2] if best else []


def _at_least_zero(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
        return value
    return parse


def _since(text: str) -> str:
    """--since: a duration back from now (90s, 10m, 2h, 1d, 1h30m) or a time (UTC unless
    it carries an offset), as the ledger stores times."""
    import re
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*"
                         r"(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", text)
    if parts and any(parts.groups()):
        d, h, m, s_ = (float(g or 0) for g in parts.groups())
        when = now - timedelta(days=d, hours=h, minutes=m, seconds=s_)
    else:
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a duration (90s, 10m, 2h, 1d, 1h30m) or a UTC time "
                f"(2026-11-30 12:00)") from None
        if when.tzinfo is not None:
            when = when.astimezone(timezone.utc)
    return when.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="config file (default: $DREAMD_CONFIG, ./dreamd.toml, then the "
                        "user config dir)")
    parser.add_argument("--data-dir", metavar="DIR", default=default,
                        help="where the ledger, frames and logs live (overrides "
                        "$DREAMD_DATA_DIR and system.data_dir)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dreamd", description="Dream Window: a living AI dream on the desktop.")
    p.add_argument("--version", action="version", version=f"dreamd {__version__}")
    _global_options(p, None)
    # the same options after the command too (`dreamd run --data-dir DIR`): given there,
    # they win; not given, they leave the value before the command alone (SUPPRESS)
    after = argparse.ArgumentParser(add_help=False)
    _global_options(after, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, parent=sub):
        sp = parent.add_parser(name, help=help, description=help, parents=[after])
        sp.set_defaults(func=fn)
        return sp

    run = add("run", cmd_run, "run the daemon in the foreground")
    run.add_argument("--duration", type=float, metavar="SECONDS",
                     help="stop cleanly after this long")
    run.add_argument("--backend", choices=("procedural", "comfyui"),
                     help="keyframe backend (overrides generation.backend)")

    sp = add("stop", cmd_stop, "stop the running daemon cleanly (also one started by the "
             "Rainmeter skin, at login, or on another host sharing the data dir) and wait "
             "for its stop; exit 0 stopped, 3 none running, 4 no stop within --timeout")
    sp.add_argument("--timeout", type=_at_least_zero(float), metavar="SECONDS", default=60.0,
                    help="how long to wait for the daemon to record its stop (default 60)")

    st = add("status", cmd_status, "data dir, ledger revision, rows per state, daemon liveness")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    op = add("open", cmd_open, "open the web viewer of the running daemon in the default "
             "browser")
    op.add_argument("--kiosk", action="store_true", help="no overlay, no controls, no cursor "
                    "(for wallpaper apps)")

    ps = add("pause", cmd_pause, "pause the dream (generation and playback)")
    ps.add_argument("--reason", help="shown in the status (default: paused by user)")
    add("resume", cmd_resume, "resume the dream")
    st_ = add("set", cmd_set, "change a live knob while the daemon runs, e.g. "
              "generation.denoise=0.4; it is stored and outlives restarts")
    st_.add_argument("assignment", metavar="KEY=VALUE", nargs="?")
    st_.add_argument("--reset", metavar="KEY", help="forget a stored knob (or `all` of them): "
                     "the config file's value applies again")
    th = add("theme", cmd_theme, "switch the theme of the next keyframe")
    th.add_argument("name", nargs="?", default="next", help="a theme name, or next")
    add("inject", cmd_inject, "make the next keyframe an injection from the aesthetic memory "
        "(a cached frame or a seed), whatever the chance")
    tu = add("tui", cmd_tui, "the dashboard: preview, buffer, pipeline, GPU, history, events, "
             "and keys that steer the dream")
    tu.add_argument("--graphics", choices=("auto", "kitty", "sixel", "halfcell", "unicode"),
                    default="auto", help="how the preview is drawn (default: the best the "
                    "terminal speaks, else half blocks)")
    ex = add("export", cmd_export, "write a stretch of the dream as .mp4, .webp or .gif, or "
             "a contact sheet of keyframes as .png")
    from dreamd.export.command import add_arguments
    add_arguments(ex)
    add("free", cmd_free, "ask ComfyUI to unload its models and free memory (what the game "
        "guard does when a game starts)")
    hi = add("history", cmd_history, "recent keyframes: theme, attempts, timing")
    hi.add_argument("-n", "--limit", type=_at_least_zero(int), metavar="N",
                    help="the newest N keyframes (default 20, or all with --since; 0 = all)")
    hi.add_argument("--since", type=_since, metavar="WHEN", help="keyframes created since a "
                    "UTC time (2026-11-30 12:00, ISO 8601 with an offset is converted) or "
                    "for a duration back from now (90s, 10m, 2h, 1d, 1h30m)")
    hi.add_argument("--format", choices=("table", "tsv", "json"), default="table")
    sq = add("sql", cmd_sql, "query the ledger read-only (a statement, or statements on stdin)")
    sq.add_argument("query", nargs="?")
    sq.add_argument("--format", choices=("table", "tsv", "json"), default="table")
    sq.add_argument("--max-rows", type=_at_least_zero(int), metavar="N", help="rows shown at most (default: "
                    "1000 in a table, all of them streamed in tsv and json; 0 = all)")
    sq.add_argument("--timeout", type=_at_least_zero(float), metavar="SECONDS",
                    help="stop a statement after this long (default 30; 0 = never)")
    sa = add("stats", cmd_stats, "the aesthetic memory over the ledger: keyframe similarity "
             "(consecutive and recent), cache size and hits, injections by reason; the "
             "dream's quality (motion, flicker, pops, colour drift, stagnation)")
    sa.add_argument("--window", type=int, metavar="W", help="keyframes per recent window "
                    "(default: cache.collapse_window)")
    sa.add_argument("--model", help="compare vectors of this model (default: the model with "
                    "the most embedded keyframes)")
    sa.add_argument("--json", action="store_true", help="machine-readable output")
    sa.add_argument("--plot", metavar="FILE.png", help="also draw motion, flicker, pops, "
                    "colour drift, similarity and injections over time into this PNG")
    se = add("seeds", cmd_seeds, "make more starting images")
    se.add_argument("-n", "--count", type=int, default=6)
    se.add_argument("--dir", help="where to write them (default: <data_dir>/seeds, or "
                    "generation.seeds_dir)")

    dr = add("doctor", cmd_doctor, "what this machine and config will use (backend, codec, "
             "embedder, GPU, seeds) and why")
    dr.add_argument("--json", action="store_true")

    mo = sub.add_parser("models", help="get a diffusion model; the ones usable here")
    mo_sub = mo.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    from dreamd.models.command import add_pull_arguments
    add_pull_arguments(add("pull", cmd_models_pull, "download a model from the Hugging Face hub "
                           "into its cache, checked (the only command that uses the network)",
                           mo_sub))
    ml = add("list", cmd_models_list, "the diffusion models and LoRAs usable here: the Hugging "
             "Face cache, comfyui.models_dir, diffusion.model", mo_sub)
    ml.add_argument("--json", action="store_true", help="machine-readable output")

    cfg = sub.add_parser("config", help="show or check configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    add("show", cmd_config_show, "print the effective config and where each value came from",
        cfg_sub)
    chk = add("check", cmd_config_check, "validate a config file", cfg_sub)
    chk.add_argument("file", metavar="FILE")

    rm = sub.add_parser("rainmeter", help="the Rainmeter skin (Windows)")
    rm_sub = rm.add_subparsers(dest="rainmeter_command", metavar="ACTION", required=True)
    ri = add("install", cmd_rainmeter_install, "copy the Dream Window skin into Rainmeter's "
             "Skins folder, set up for this install (data dir, output dir, this python)",
             rm_sub)
    ri.add_argument("--skins-dir", metavar="DIR", help="Rainmeter's Skins folder (default: "
                    "Rainmeter.ini's SkinPath, else Documents\\Rainmeter\\Skins; needed off "
                    "Windows)")
    ri.add_argument("--no-autostart", action="store_true", help="do not start `dreamd run` "
                    "when the skin loads and no daemon runs")

    db = sub.add_parser("db", help="ledger migrations")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = add("upgrade", cmd_db_upgrade, "migrate the ledger (to head by default)", db_sub)
    up.add_argument("revision", nargs="?", default="head")
    down = add("downgrade", cmd_db_downgrade, "migrate the ledger down to REVISION", db_sub)
    down.add_argument("revision")
    down.add_argument("--yes", action="store_true", help="do not ask before a downgrade that "
                      "empties the ledger (to base)")
    add("current", cmd_db_current, "the ledger's revision", db_sub)
    add("history", cmd_db_history, "every migration, base to head", db_sub)

    from dreamd.cli.life import add_commands          # service, uninstall
    add_commands(sub, add)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"dreamd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, LedgerUnusableError) as exc:
        print(f"dreamd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DreamdError as exc:
        print(f"dreamd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # a ledger file that is garbage, damaged or in a read-only place: one line, no
        # traceback (anything else is a bug, and keeps its traceback)
        from dreamd.ledger.unusable import explain

        problem = explain(exc, getattr(args, "ledger_path", None))
        if problem is None:
            raise
        print(f"dreamd: {problem}", file=sys.stderr)
        return EXIT_USAGE
