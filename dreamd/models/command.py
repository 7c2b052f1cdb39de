"""`dreamd models pull` and `dreamd models list`: arguments and what is printed. Light at
import (the parser is built for every command)."""

from __future__ import annotations

import argparse
import json
import sys


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", metavar="ID", help="a hub id, e.g. "
                   "stable-diffusion-v1-5/stable-diffusion-v1-5 (a diffusers pipeline: its fp16 "
                   "safetensors, configs and tokenizer), a single-file checkpoint repo, or a "
                   "LoRA such as latent-consistency/lcm-lora-sdv1-5")
    p.add_argument("--revision", default="main", metavar="R",
                   help="a branch, tag or commit of the repo (default: main)")
    p.add_argument("--file", metavar="NAME", help="one file of the repo (a name or a glob), "
                   "for a repo that holds several checkpoints, or one checkpoint of a "
                   "pipeline repo")


def pull(args: argparse.Namespace) -> int:
    from dreamd.backends.diffusion import locate
    from dreamd.models.pull import pull as fetch
    from dreamd.models.selection import human

    done = fetch(args.id, args.revision, args.file)
    count = len(done.selection.files)
    print(f"{done.repo_id}: {count} file{'s' if count != 1 else ''} checked against the hub's "
          f"listing ({human(done.selection.size)}, {human(done.fetched)} fetched now) in "
          f"{done.snapshot}")
    if done.selection.variant:
        print(f"its weights are diffusers' {done.selection.variant} variant")
    print("to use it, put in dreamd.toml:\n")
    print("\n".join(done.lines))
    found = locate.Located(spec=done.repo_id, kind="folder", path=done.snapshot, family=None,
                           where="pulled", hub_id=done.repo_id)
    notice = locate.licence_notice(found)
    if done.licence or notice:
        print()
    if done.licence:
        print(f"licence (as the hub lists it): {done.licence}")
    if notice:
        print(notice)
    return 0


def list_models(cfg, args: argparse.Namespace) -> int:
    from dreamd.models.inventory import inventory
    from dreamd.models.selection import human

    found = inventory(cfg)
    if args.json:
        print(json.dumps(found.as_json(), indent=2))
        return 0
    rows = [("", "KIND", "FAMILY", "SIZE", "MODEL (the value for the config)")]
    for e in found.entries:
        rows.append(("*" if e.configured else "", e.kind, e.label,
                     human(e.size) if e.size else "-", e.value))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        e = found.entries[i - 1] if i else None
        if e is not None and (e.note or not e.usable):
            print(" " * (sum(widths) + 8) + f"({e.note or 'not usable'})")
    if not found.entries:
        print("(none)")
    for p in found.partial:
        print(f"partial download of {p['hub_id']} ({human(p['bytes'])} kept): `{p['resume']}` "
              f"resumes it")
    print(f"\nsearched: the Hugging Face cache {found.hub_cache}" + (
        f"; comfyui.models_dir {found.comfyui_models_dir} (checkpoints/, loras/, diffusers/)"
        if found.comfyui_models_dir else "; no comfyui.models_dir set"))
    if any(e.configured for e in found.entries):
        print("* = what diffusion.model / diffusion.lora point at")
    if not any(e.usable and e.kind != "lora" for e in found.entries):
        print("no model yet: `dreamd models pull stable-diffusion-v1-5/stable-diffusion-v1-5`, "
              "or set diffusion.model to a .safetensors checkpoint you have", file=sys.stderr)
    return 0
