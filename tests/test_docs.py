"""The docs stay true: every config key, table, column and state is documented, the
configuration reference is what the schema generates, and the README and the docs it
links to are where they say."""

from __future__ import annotations

import re

import pytest

from dreamd import config, config_reference
from dreamd.ledger.models import Base
from dreamd.ledger.states import TRANSITIONS
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = REPO / "docs"
CONFIGURATION = (DOCS / "configuration.md").read_text(encoding="utf-8")
LEDGER = (DOCS / "ledger.md").read_text(encoding="utf-8")


def test_the_configuration_reference_is_what_the_schema_generates():
    assert CONFIGURATION == config_reference.render(), \
        f"docs/configuration.md is out of date: run `{config_reference.REGENERATE}`"


def test_the_reference_words_name_only_keys_of_the_schema():
    keys = {p for p, _ in config.key_paths()}
    for table in (config_reference.MORE, config_reference.ALLOWED, config_reference.DEFAULTS):
        assert set(table) <= keys, set(table) - keys


@pytest.mark.parametrize("path", [p for p, _ in config.key_paths()])
def test_every_config_key_is_documented(path):
    f = dict(config.key_paths())[path]
    row = next(line for line in CONFIGURATION.splitlines() if line.startswith(f"| `{path}` |"))
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
    assert len(cells) == 5 and cells[4], row                      # a doc for every key
    assert (cells[3] == "yes") == f.metadata["live"], row        # live knobs marked
    for bound in ("min", "max"):
        value = f.metadata[bound]
        if value is not None and value < 1_000_000:
            assert config_reference._number(value) in cells[2], row


@pytest.mark.parametrize("table", sorted(Base.metadata.tables))
def test_every_table_and_column_is_documented(table):
    section = LEDGER.split("## Tables", 1)[1]
    assert f"`{table}`" in section, f"table {table} is not documented in docs/ledger.md"
    for column in Base.metadata.tables[table].columns:
        assert re.search(rf"\b{column.name}\b", section), \
            f"column {table}.{column.name} is not documented in docs/ledger.md"


def test_every_state_is_documented():
    states = {s for edges in TRANSITIONS.values() for edge in edges for s in edge if s}
    for state in states:
        assert f"`{state}`" in LEDGER, f"state {state} is not documented in docs/ledger.md"


def test_readme_names_the_two_commands():
    assert "make run" in README and "make test" in README


def _links(path):
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not target.startswith(("http://", "https://", "mailto:")):
            yield target


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_every_link_between_the_docs_lands(page):
    """A section moved or renamed breaks no link: each relative link names a file that
    exists and, with a #fragment, a heading in it."""
    source = REPO / page
    for target in _links(source):
        file, _, fragment = target.partition("#")
        dest = (source.parent / file).resolve() if file else source
        assert dest.exists(), f"{page}: link to {target}: no such file"
        if fragment and dest.suffix == ".md":
            assert fragment in _anchors(dest.read_text(encoding="utf-8")), \
                f"{page}: link to {target}: no such heading"


def _commands(parser, prefix=()):
    import argparse
    for action in parser._actions:                                  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):          # noqa: SLF001
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_every_command_is_in_the_commands_reference():
    """A command added to the parser is documented in docs/commands.md: `dreamd NAME`,
    and each of its actions on the line that names it."""
    from dreamd.cli import build_parser

    text = (DOCS / "commands.md").read_text(encoding="utf-8")
    for path in _commands(build_parser()):
        lines = [x for x in text.splitlines() if f"`dreamd {path[0]}" in x]
        assert lines, f"dreamd {path[0]} is not in docs/commands.md"
        if len(path) > 1:
            assert any(re.search(rf"\b{path[1]}\b", x) for x in lines), \
                f"dreamd {' '.join(path)} is not in docs/commands.md"


def test_the_readme_s_knobs_table_agrees_with_the_schema():
    """README "Tune: the knobs that matter": each default as the schema has it, and
    "(live)" exactly on the rows whose keys are all live knobs."""
    fields = dict(config.key_paths())
    section = README.split("## Tune: the knobs that matter", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 8
    for row in rows:
        knobs, default, what = [c.strip() for c in row.strip().strip("|").split(" | ")]
        keys = re.findall(r"`([a-z_]+\.[a-z_]+)`", knobs)
        assert keys and all(k in fields for k in keys), row
        shown = re.findall(r"`([^`]+)`", default)
        backticked = [k for k in keys if config_reference._default(k, fields[k]).startswith("`")]
        assert shown == [config_reference._default(k, fields[k]).strip("`") for k in backticked], row
        assert what.endswith("(live)") == all(fields[k].metadata["live"] for k in keys), row
