"""The commands of dreamd's life on a machine beyond one run: `dreamd service` (start at
login) and `dreamd uninstall` (what dreamd owns, deleted on confirmation). Light: no
torch, no ledger; registered by dreamd/cli/__init__.py."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def _config(args: argparse.Namespace):
    from dreamd import config
    return config.load(args.config, args.data_dir)


def _service(args: argparse.Namespace):
    from dreamd import service
    return service.service_for(_config(args), kind=args.system)


def cmd_service_install(args: argparse.Namespace) -> int:
    from dreamd import service
    svc = _service(args)
    print("\n".join(service.install(svc, None if args.no_enable else service.runner_for(svc))))
    return 0


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    from dreamd import service
    svc = _service(args)
    print("\n".join(service.uninstall(svc, None if args.no_enable else service.runner_for(svc))))
    return 0


def cmd_service_show(args: argparse.Namespace) -> int:
    from dreamd import service
    print("\n".join(service.show(_service(args))))
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from dreamd import uninstall
    from dreamd.errors import UsageError

    cfg = _config(args)
    items = uninstall.owned_paths(cfg, skins_dir=args.skins_dir)
    print("dreamd owns these paths here:")
    print("\n".join(uninstall.report(items)))
    note = uninstall.remote_note(cfg)
    if note:
        print(note)
    print("models fetched by `dreamd models pull` stay in the shared Hugging Face cache "
          "(`hf cache ls`, `hf cache rm model/ID`)")
    if args.dry_run:
        print("dry run: nothing was deleted")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("dreamd uninstall deletes these files: confirm with --yes "
                             "(no terminal to ask on), or look first with --dry-run")
        answer = input("delete them (the virtual environment and the checkout stay)? "
                       "[y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 0
    print("\n".join(uninstall.delete(cfg, items)))
    return 0


def add_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    sv = sub.add_parser("service", help="start the daemon at login: a systemd user unit, a "
                        "LaunchAgent (macOS) or a Startup-folder entry (Windows)")
    sv_sub = sv.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    for name, fn, text in (
            ("install", cmd_service_install, "write the service file for this install "
             "(config, data dir, this python) and enable it now"),
            ("uninstall", cmd_service_uninstall, "stop and remove the service"),
            ("show", cmd_service_show, "print the service file and where it goes, changing "
             "nothing")):
        sp = add(name, fn, text, sv_sub)
        sp.add_argument("--system", choices=("systemd", "launchd", "startup"),
                        help="which kind (default: this system's)")
        if name != "show":
            sp.add_argument("--no-enable", action="store_true", help="only write or remove "
                            "the file; print the systemctl/launchctl commands to run")
    un = add("uninstall", cmd_uninstall, "list every path dreamd owns here, then delete them "
             "on confirmation (the venv and the checkout are only listed)")
    un.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    un.add_argument("--yes", action="store_true", help="delete without asking")
    un.add_argument("--skins-dir", metavar="DIR", help="Rainmeter's Skins folder, when the "
                    "skin was installed with --skins-dir")
