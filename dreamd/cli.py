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
from dreamd.errors import ConfigError, DreamdError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _config(args: argparse.Namespace):
    from dreamd import config
    return config.load(args.config, args.data_dir)


# ---------------------------------------------------------------- commands

def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.backend:
        cfg.generation.backend = args.backend
        cfg.sources["generation.backend"] = "--backend"
    from dreamd.daemon import run
    return run(cfg, duration=args.duration)


def cmd_status(args: argparse.Namespace) -> int:
    from dreamd.ledger import database, queries

    cfg = _config(args)
    head = database.head_revision()
    if not cfg.db_path.exists():
        report: dict[str, Any] = {"data_dir": str(cfg.data_dir), "database": str(cfg.db_path),
                                  "revision": None, "head": head, "counts": {},
                                  "last_run": None, "alive": False, "paused": False,
                                  "playhead": None}
    else:
        revision = database.current_revision(cfg.db_path)
        if revision is None:
            report = {"data_dir": str(cfg.data_dir), "database": str(cfg.db_path),
                      "revision": None, "head": head, "counts": {}, "last_run": None,
                      "alive": False, "paused": False, "playhead": None}
        else:
            engine = database.reader(cfg.db_path)
            try:
                with engine.connect() as conn:
                    report = queries.status(conn, str(cfg.data_dir), str(cfg.db_path),
                                            revision, head).as_dict()
            finally:
                engine.dispose()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    from dreamd.display.report import print_status
    print_status(report)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from dreamd import config

    cfg = _config(args)
    where, how = (str(cfg.file), "") if cfg.file else ("(none)", "")
    print(f"# config file: {where}{how}")
    print(f"# data dir:    {cfg.data_dir}  ({cfg.sources.get('system.data_dir')})")
    print(config.to_toml(cfg), end="")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from dreamd import config

    config.check_file(args.file)
    print(f"{args.file}: ok")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from dreamd.ledger import database

    cfg = _config(args)
    before = database.current_revision(cfg.db_path)
    database.upgrade(cfg.db_path, args.revision)
    after = database.current_revision(cfg.db_path)
    print(f"{cfg.db_path}: {before or 'empty'} -> {after}")
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from dreamd.ledger import database

    cfg = _config(args)
    database.downgrade(cfg.db_path, args.revision)
    print(f"{cfg.db_path}: now at {database.current_revision(cfg.db_path) or 'base'}")
    return 0


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


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamd", description="Dream Window: a living AI dream "
                                "on the desktop.")
    p.add_argument("--version", action="version", version=f"dreamd {__version__}")
    p.add_argument("--config", metavar="FILE", help="config file (default: $DREAMD_CONFIG, "
                   "./dreamd.toml, then the user config dir)")
    p.add_argument("--data-dir", metavar="DIR", help="where the ledger, frames and logs live "
                   "(overrides $DREAMD_DATA_DIR and system.data_dir)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, parent=sub):
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    run = add("run", cmd_run, "run the daemon in the foreground")
    run.add_argument("--duration", type=float, metavar="SECONDS",
                     help="stop cleanly after this long")
    run.add_argument("--backend", choices=("procedural", "comfyui"),
                     help="keyframe backend (overrides generation.backend)")

    st = add("status", cmd_status, "data dir, ledger revision, rows per state, daemon liveness")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    cfg = sub.add_parser("config", help="show or check configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    add("show", cmd_config_show, "print the effective config and where each value came from",
        cfg_sub)
    chk = add("check", cmd_config_check, "validate a config file", cfg_sub)
    chk.add_argument("file", metavar="FILE")

    db = sub.add_parser("db", help="ledger migrations")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = add("upgrade", cmd_db_upgrade, "migrate the ledger (to head by default)", db_sub)
    up.add_argument("revision", nargs="?", default="head")
    down = add("downgrade", cmd_db_downgrade, "migrate the ledger down to REVISION", db_sub)
    down.add_argument("revision")
    add("current", cmd_db_current, "the ledger's revision", db_sub)
    add("history", cmd_db_history, "every migration, base to head", db_sub)
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
    except DreamdError as exc:
        print(f"dreamd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
