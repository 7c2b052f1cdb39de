"""Every command the README and docs/ show in a shell block is one dreamd accepts, every
TOML block is a config dreamd accepts, and the cheap read-only ones run for real against
a temp data dir (issue 25: a newcomer copies them as they are)."""

from __future__ import annotations

import re
import shlex

import pytest

from dreamd import config
from dreamd.cli import build_parser
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console", "powershell", "")
# Commands built on another branch at the same time (issue 25: `dreamd stop`); each
# test below fails once the parser knows it, so the entry is removed and checked.
PENDING: set[str] = set()
TYPO_EXAMPLES = {"stauts"}     # docs/commands.md: a misspelt command gets a suggestion
# Read-only commands cheap enough to run for real.
REAL = {"status", "config", "history", "stats", "service", "uninstall", "db", "models"}


def _blocks(kinds: tuple[str, ...]):
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for lang, body in re.findall(r"^ *```(\w*)\n(.*?)^ *```", text, re.M | re.S):
            if lang in kinds:
                yield page.relative_to(REPO), body


def shown_commands() -> list[tuple[str, list[str]]]:
    out = []
    for page, body in _blocks(SHELLS):
        for line in body.splitlines():
            line = re.sub(r"^\s*(\.venv[/\\](bin|Scripts)[/\\])", "", line.strip())
            if line.startswith("dreamd "):
                out.append((f"{page}: {line}", shlex.split(line.replace("\\", "/"),
                                                           comments=True)[1:]))
    return out


def inline_commands() -> list[tuple[str, list[str]]]:
    """`dreamd …` in running text, when written as typed: no placeholder (FILE, KEY, N),
    no optional part ([…]), no alternatives (|), no ellipsis."""
    out = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for span in re.findall(r"`(dreamd [^`]+)`", text):
            if re.search(r"[\[\]|…<>]|\b[A-Z]{1,}\b|\.\.\.", span):
                continue
            out.append((f"{page.relative_to(REPO)}: {span}", shlex.split(span)[1:]))
    return out


COMMANDS = shown_commands()
INLINE = inline_commands()


def test_the_docs_show_commands():
    assert any(a[:2] == ["service", "install"] for _, a in COMMANDS)
    assert len(COMMANDS) >= 15 and len(INLINE) >= 40, (len(COMMANDS), len(INLINE))


def _pending(args: list[str]) -> bool:
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)   # noqa: SLF001
    if args[0] in PENDING:
        assert args[0] not in commands, f"`dreamd {args[0]}` exists now: remove it from PENDING"
        return True
    return False


@pytest.mark.parametrize("where,args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_command_in_a_shell_block_parses(where, args):
    """Typed as shown, dreamd takes every argument."""
    if _pending(args):
        return
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: dreamd refuses these arguments")


@pytest.mark.parametrize("where,args", INLINE, ids=[w for w, _ in INLINE])
def test_every_command_named_in_the_text_exists(where, args, capsys):
    """A command named in running text (`dreamd models pull`, `dreamd set
    governor.enabled=false`) exists: its --help answers. The docs' example of a typo
    (`dreamd stauts`) is the one exception."""
    if args[0] in TYPO_EXAMPLES or _pending(args):
        return
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*args, "--help"])
    assert done.value.code == 0, f"{where}: no such command"


TOMLS = list(_blocks(("toml",)))


@pytest.mark.parametrize("page,body", TOMLS, ids=[f"{p}#{i}" for i, (p, _) in enumerate(TOMLS)])
def test_every_toml_block_is_a_valid_config(page, body, tmp_path):
    config.parse(body, f"{page}", base_dir=tmp_path)


def test_the_cheap_commands_run_for_real(dreamd_env, tmp_path, monkeypatch, capsys):
    """The docs' read-only commands, in-process against a fresh data dir, with the
    README's own ComfyUI config as ./dreamd.toml (what it tells a newcomer to write)."""
    from dreamd.cli import main

    readme = next(b for p, b in TOMLS if p.name == "README.md" and 'backend = "comfyui"' in b)
    (tmp_path / "dreamd.toml").write_text(readme, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DREAMD_DATA_DIR", dreamd_env["DREAMD_DATA_DIR"])
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))          # no systemctl to run
    # a ledger, as the first `dreamd run` (or the docs' `dreamd db upgrade`) makes it
    assert main(["db", "upgrade"]) == 0
    ran, seen = 0, set()
    for where, args in COMMANDS + INLINE:
        if args[0] not in REAL or args[:2] in (["models", "pull"], ["service", "install"],
                                                ["service", "uninstall"]) \
                or args[:1] == ["uninstall"] and "--dry-run" not in args \
                or tuple(args) in seen:
            continue
        try:
            build_parser().parse_args(args)
        except SystemExit:
            continue                    # a command named, not one typed in full
        seen.add(tuple(args))
        assert main(list(args)) == 0, (where, capsys.readouterr().err)
        ran += 1
    assert ran >= 8, seen


def test_a_windows_path_in_double_quotes_gets_the_readme_s_advice(tmp_path):
    """The README: Windows paths in single quotes. Written in double quotes, the error
    says so; in single quotes the same path is taken as it is."""
    from dreamd.errors import ConfigError

    bad = '[comfyui]\nmodels_dir = "C:\\ComfyUI\\models"\n'
    with pytest.raises(ConfigError) as info:
        config.parse(bad, "dreamd.toml")
    message = str(info.value)
    assert "dreamd.toml" in message and "line 2" in message
    assert "single quotes, 'C:\\ComfyUI\\models'" in message
    good = config.parse("[comfyui]\nmodels_dir = 'C:\\ComfyUI\\models'\n", "dreamd.toml")
    assert good.comfyui.models_dir == "C:\\ComfyUI\\models"
    # an error elsewhere in a file gets no such hint
    with pytest.raises(ConfigError) as other:
        config.parse("[display]\nfps = = 4\n", "dreamd.toml")
    assert "single quotes" not in str(other.value)
