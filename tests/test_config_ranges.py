"""Every config key refuses what it does not allow, in a config file and through
`dreamd set`, with a message naming the key and what would be right (issue 16: ranges
were tested for one key of dozens). The cases are generated from the schema, so a key
added later is covered the day it is added; the README's table is checked against the
same schema in test_docs.py."""

from __future__ import annotations

import math
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from dreamd import config
from dreamd.errors import ConfigError

KEYS = config.key_paths()


def _type(path: str) -> Any:
    section, name = path.split(".")
    return get_type_hints(config._section_class(section))[name]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _file(path: str, value: Any) -> str:
    section, name = path.split(".")
    return f"[{section}]\n{name} = {_toml(value)}\n"


def _refused(path: str, value: Any, expected: str) -> None:
    """Refused the same way by a config file and by a knob, naming the key."""
    with pytest.raises(ConfigError) as by_value:
        config.check_value(path, value)
    with pytest.raises(ConfigError) as by_file:
        config.parse(_file(path, value), "test.toml")
    for info in (by_value, by_file):
        message = str(info.value)
        assert path in message and expected in message, message


def _bounds():
    for path, f in KEYS:
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is not None or hi is not None:
            yield pytest.param(path, lo, hi, id=path)


def _choices():
    for path, f in KEYS:
        if f.metadata.get("choices"):
            yield pytest.param(path, f.metadata["choices"], id=path)


def _scalars():
    for path, _ in KEYS:
        if _type(path) in (bool, int, float, str):
            yield pytest.param(path, _type(path), id=path)


def test_the_schema_gives_every_number_a_range():
    """A number without bounds lets a typo (fps = 4000, lease_seconds = -1) through."""
    unbounded = [path for path, f in KEYS if _type(path) in (int, float)
                 and (f.metadata.get("min") is None or f.metadata.get("max") is None)]
    assert unbounded == []


@pytest.mark.parametrize("path, lo, hi", list(_bounds()))
def test_a_number_outside_its_range_is_refused_and_its_ends_are_taken(path, lo, hi):
    tp = _type(path)
    step = 1 if tp is int else max((hi - lo) * 1e-3, 1e-6)
    cast = int if tp is int else float
    for bad in (lo - step, hi + step):
        _refused(path, cast(bad), f"expected a value between {lo:g} and {hi:g}")
    for good in (lo, hi):
        assert config.check_value(path, cast(good)) == cast(good)
    if tp is float:
        for bad in (math.nan, math.inf):
            _refused(path, bad, "expected a finite number")


@pytest.mark.parametrize("path, choices", list(_choices()))
def test_a_word_outside_its_choices_is_refused_and_each_choice_is_taken(path, choices):
    for choice in choices:
        assert config.check_value(path, choice) == choice
    _refused(path, "no-such-" + choices[0], "expected one of " + repr(choices[0]))


@pytest.mark.parametrize("path, tp", list(_scalars()))
def test_a_value_of_the_wrong_type_is_refused(path, tp):
    wrong, expected = {bool: (1, "true or false"), int: ("4", "an integer"),
                       float: ("4", "a number"), str: (4, "a string")}[tp]
    _refused(path, wrong, expected)
    if tp in (int, float):
        _refused(path, True, expected)         # TOML's true is not 1


def test_lists_and_tables_check_their_items():
    for path, _ in KEYS:
        tp = _type(path)
        if get_origin(tp) is list and get_args(tp)[0] in (int, float, str):
            _refused(path, [{}], f"{path}[0]")
        elif get_origin(tp) is dict:
            _refused(path, {"k": []}, f"{path}.k")
