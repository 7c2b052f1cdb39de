"""The Rainmeter skin, checked the way Rainmeter reads it (no Windows needed): its files'
encoding, INI structure, variables and sections; its WebParser expression translated
faithfully from PCRE (with the U flag) to Python and run on status.json files written
by the real display writer; the crossfade's trigger; and the installer's Variables.inc
with Windows paths, down to the command lines the buttons and the launcher run."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path, PureWindowsPath

import pytest
from sqlalchemy import text

from dreamd import config, rainmeter
from dreamd.display.writer import DisplayWriter
from dreamd.errors import UsageError
from tests.conftest import REPO, dreamd_cmd
from tests.test_display import add_segment, ctx  # noqa: F401  (the fixture)
from tests.test_display_unit import clock, frame_ticks  # noqa: F401  (the fixture)

SKIN = REPO / "rainmeter_skin"
INI = SKIN / "DreamWindow.ini"
BUILTIN = {"@", "CURRENTPATH", "CURRENTFILE", "CURRENTCONFIG", "ROOTCONFIGPATH", "SKINSPATH",
           "SETTINGSPATH", "PROGRAMPATH", "CRLF"}


# ---------------------------------------------------------------- reading like Rainmeter

def decode(path: Path) -> str:
    """Rainmeter's rule: UTF-16 LE with a BOM for anything not ASCII."""
    raw = path.read_bytes()
    if raw.startswith(b"\xff\xfe"):
        return raw[2:].decode("utf-16-le")
    return raw.decode("ascii")          # anything else must be pure ASCII


def read_ini(path: Path, include_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """Sections of a skin file as Rainmeter sees them: keys case-insensitive (kept as
    written here), the first of a duplicate wins, a value wrapped in one pair of quotes
    ('"..."' or "'...'") loses them, and @Include=#@#FILE merges FILE's keys in place."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in decode(path).splitlines():
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("[") and line.endswith("]") and "=" not in line:
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: not INI: {line!r}"
        key, value = line.split("=", 1)
        if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
            value = value[1:-1]
        if key.lower().startswith("@include"):
            included = read_ini((include_dir or path.parent) / value.replace("#@#", "")
                                .replace("\\", "/"))
            for name, keys in included.items():
                for k, v in keys.items():
                    sections.setdefault(name, {})[k] = v      # included values win
            continue
        if key.lower() not in {k.lower() for k in current}:
            current[key] = value
    return sections


def skin(variables_inc: Path | None = None) -> dict[str, dict[str, str]]:
    resources = SKIN / "@Resources"
    if variables_inc is not None:
        resources = variables_inc.parent
    return read_ini(INI, include_dir=resources)


def substitute(value: str, variables: dict[str, str]) -> str:
    """#Name# replaced, case-insensitively and until none is left."""
    lower = {k.lower(): v for k, v in variables.items()}
    for _ in range(10):
        new = re.sub(r"#(\w+)#", lambda m: lower.get(m.group(1).lower(), m.group(0)), value)
        if new == value:
            return new
        value = new
    return value


# ---------------------------------------------------------------- PCRE to Python

def pcre_to_python(pattern: str) -> re.Pattern:
    """A PCRE expression as Rainmeter's WebParser compiles it, in Python's `re`: leading
    inline flags kept, except U (PCRE_UNGREEDY), which swaps the greediness of every
    quantifier: `*` becomes `*?` and `*?` becomes `*` (likewise +, ?, {m,n})."""
    flags = re.match(r"\(\?([a-zA-Z]+)\)", pattern)
    letters = flags.group(1) if flags else ""
    ungreedy = "U" in letters
    body = pattern[flags.end():] if flags else pattern
    out, i, in_class = [], 0, False
    while i < len(body):
        c = body[i]
        if c == "\\":
            out.append(body[i:i + 2])
            i += 2
            continue
        if in_class:
            out.append(c)
            in_class = c != "]"
            i += 1
            continue
        if c == "[":
            j = i + 1 + (body[i + 1:i + 2] == "^")
            j += body[j:j + 1] == "]"          # a ] first in a class is literal
            out.append(body[i:j])
            in_class, i = True, j
            continue
        if c == "(" and body[i + 1:i + 2] == "?":
            out.append("(?")                    # group syntax, not a quantifier
            i += 2
            continue
        counted = re.match(r"\{\d+(,\d*)?\}", body[i:]) if c == "{" else None
        if c in "*+?" or counted:
            q = counted.group(0) if counted else c
            i += len(q)
            lazy = body[i:i + 1] == "?"
            possessive = body[i:i + 1] == "+"
            if possessive:
                out.append(q + "+")
                i += 1
            elif ungreedy and not re.fullmatch(r"\{\d+\}", q):
                out.append(q if lazy else q + "?")
                i += lazy
            else:
                out.append(q + ("?" if lazy else ""))
                i += lazy
            continue
        out.append(c)
        i += 1
    kept = "".join(ch for ch in letters if ch in "imsx")
    return re.compile((f"(?{kept})" if kept else "") + "".join(out))


def test_the_translation_swaps_greediness_under_u():
    assert pcre_to_python("(?U)a(.*)b").search("a1b2b").group(1) == "1"
    assert pcre_to_python("(?U)a(.*?)b").search("a1b2b").group(1) == "1b2"
    assert pcre_to_python("a(.*)b").search("a1b2b").group(1) == "1b2"
    assert pcre_to_python("(?siU)x(\\d{2})([a-z]+)").search("X12abc").groups() == ("12", "a")
    assert pcre_to_python("(?U)([*?]+)").search("*?*").group(1) == "*"


# ---------------------------------------------------------------- files and structure

def test_skin_files_are_in_an_encoding_rainmeter_reads():
    for path in [INI, *(SKIN / "@Resources").iterdir()]:
        content = decode(path)            # ASCII, or UTF-16 LE with its BOM
        assert "\n" not in content.replace("\r\n", ""), f"{path.name}: CRLF line ends"


def test_the_skin_parses_as_ini():
    sections = skin()
    # configparser agrees on the structure (a second, independent reader)
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",),
                                       comment_prefixes=(";",))
    parser.optionxform = str
    parser.read_string(decode(INI))
    assert set(parser.sections()) == set(sections)
    assert {"Rainmeter", "Metadata", "Variables", "MeasureStatusJson", "MeterCurrent",
            "MeterPrevious", "MeasureFade"} <= set(sections)


def references(sections) -> dict[str, set[str]]:
    """Every variable, section and group a skin value names."""
    variables, names, groups = set(), set(), set()
    for section, keys in sections.items():
        for key, value in keys.items():
            variables |= set(re.findall(r"#(\w+|@)#", value))
            names |= {n for n in re.findall(r"\[(\w+)(?::[^\]]*)?\]", value)
                      if not n.startswith("!")}
            names |= set(re.findall(r"!(?:CommandMeasure|UpdateMeter|ShowMeter|HideMeter|"
                                    r"SetOption|UpdateMeasure)\s+\"?(\w+)", value))
            groups |= set(re.findall(r"!(?:Show|Hide|Update)MeterGroup\s+(\w+)", value))
            if key.lower().startswith("measurename") or key.lower() == "meterstyle":
                names.add(value)
            if keys.get("Measure") == "Calc" and key == "Formula" or key.startswith("IfCondition"):
                names |= {w for w in re.findall(r"\b(Measure\w+)", value)}
            if key.startswith("ActionList"):
                names |= {f"{section}.{a.split(',')[0].split()[-1]}"
                          for a in value.split("|")}
    return {"variables": variables, "sections": names, "groups": groups}


def test_every_variable_section_and_group_named_is_defined():
    sections = skin()
    refs = references(sections)
    defined = {k.lower() for k in sections["Variables"]}
    # variables set at run time are defined (with a default) in [Variables] too
    set_later = set(re.findall(r"!SetVariable\s+(\w+)", decode(INI)))
    assert {v.lower() for v in set_later} <= defined
    missing = {v for v in refs["variables"] if v.lower() not in defined and v not in BUILTIN}
    assert not missing, f"variables used but never defined: {missing}"
    actions = {f"{s}.{k}" for s, keys in sections.items() for k in keys}
    unknown = {n for n in refs["sections"] if n not in sections and n not in actions}
    assert not unknown, f"measures or meters named but missing: {unknown}"
    grouped = {v for keys in sections.values() for k, v in keys.items() if k == "Group"}
    assert refs["groups"] <= grouped
    # the variable that names the pause button's measure only ever names real ones
    pause_targets = set(re.findall(r"!SetVariable\s+PauseCommand\s+(\w+)", decode(INI)))
    assert pause_targets | {sections["Variables"]["PauseCommand"]} <= set(sections)


def test_the_installed_skin_defines_everything_too(tmp_path):
    cfg = windows_config(r"C:\Users\Zoë Q\dream data")
    inc = tmp_path / "Variables.inc"
    inc.write_bytes((rainmeter.BOM + rainmeter.variables(cfg, python=PYTHON))
                    .encode("utf-16-le"))
    sections = skin(inc)
    assert sections["Variables"]["DataDir"] == r"C:\Users\Zoë Q\dream data"
    template = read_ini(SKIN / "@Resources" / "Variables.inc")["Variables"]
    assert set(template) <= set(sections["Variables"])


# ---------------------------------------------------------------- status.json

def webparser(sections):
    """The parent's expression, and each child measure's (StringIndex, Substitute)."""
    parent = sections["MeasureStatusJson"]
    children = {name: keys for name, keys in sections.items()
                if keys.get("Measure") == "WebParser" and keys.get("URL") == "[MeasureStatusJson]"}
    return parent["RegExp"], children


def child_value(match: re.Match, keys: dict[str, str]) -> str:
    """What a child measure shows: its group, then its Substitute (RegExpSubstitute)."""
    value = match.group(int(keys["StringIndex"])) or ""
    subs = keys.get("Substitute")
    if subs:
        assert keys.get("RegExpSubstitute") == "1"
        pairs = re.findall(r'"([^"]*)":"([^"]*)"', '"' + subs + '"' if not subs.startswith('"')
                           else subs)
        for pattern, repl in pairs:
            value = pcre_to_python(pattern).sub(re.sub(r"\\(\d)", r"\\g<\1>", repl), value)
    return value


def group_keys(pattern: str) -> list[str]:
    """The status.json key each capture group of the expression reads, in order."""
    keys, current = [], None
    for m in re.finditer(r'"(\w+)": |\\.|\((?!\?)', pattern):
        if m.group(1):
            current = m.group(1)
        elif m.group(0) == "(":
            keys.append(current)
    return keys


def expected(status: dict, key: str) -> str:
    import json
    value = status[key]
    if key == "last_update":
        return value[:19]
    if value is None:
        return ""
    if isinstance(value, str):
        return json.dumps(value)[1:-1]          # as JSON spells it, escapes and all
    return json.dumps(value)


LONG_PROMPT = ("a cathedral of light, \"status\": \"lies\", commas, colons: {braces}, "
               "back\\slashes, ünïcödé, " * 40).strip(", ")


def written(ctx, *, paused: str | None = None, stopped: bool = False) -> tuple[str, dict]:
    import json
    add_segment(ctx, 0, 3)
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE keyframes SET prompt = :p, theme = 'deep sea' "
                          "WHERE chain_index = 0"), {"p": LONG_PROMPT})
    w = DisplayWriter(ctx)
    for _ in range(3):
        w.tick()
    if paused:
        ctx.facts.update(paused=True, pause_reason=paused, paused_by="guard")
        w.tick()
    if stopped:
        w.write_status(ctx.knob("display.fps"), 0, daemon_status="stopped", state="stopped")
    raw = (ctx.cfg.output_dir / "status.json").read_text(encoding="utf-8")
    return raw, json.loads(raw)


@pytest.mark.parametrize("case", ["playing", "paused", "stopped"])
def test_the_webparser_expression_reads_every_field_it_names(ctx, case):  # noqa: F811
    raw, status = written(ctx, paused="eldenring.exe" if case == "paused" else None,
                          stopped=case == "stopped")
    sections = skin()
    pattern, children = webparser(sections)
    match = pcre_to_python(pattern).search(raw)
    assert match, f"the expression does not match status.json:\n{raw}"
    keys = group_keys(pattern)
    assert len(keys) == match.re.groups and all(keys)
    for i, key in enumerate(keys, start=1):
        assert match.group(i) is not None, key
    by_index = {int(c["StringIndex"]): (name, c) for name, c in children.items()}
    assert sorted(by_index) == list(range(1, len(keys) + 1)), "one child per group"
    for index, (name, c) in by_index.items():
        key = keys[index - 1]
        # strings lose their quotes, null becomes empty, numbers read as written
        assert child_value(match, c) == expected(status, key), f"{name} ({key})"
    if case == "paused":
        assert child_value(match, sections["MeasurePauseReason"]) == "eldenring.exe"
        assert child_value(match, sections["MeasurePausedBy"]) == "guard"
        assert child_value(match, sections["MeasurePaused"]) == "true"
    if case == "stopped":
        assert child_value(match, sections["MeasureDaemonStatus"]) == "stopped"
    assert child_value(match, sections["MeasureTheme"]) == "deep sea"
    assert len(child_value(match, sections["MeasurePrompt"])) > 2000


def test_the_fade_trigger_changes_at_every_frame(ctx, clock):  # noqa: F811
    """At up to 10 fps (the skin reads status.json every 100 ms) every frame on screen
    comes with its own status.json, whose frame_number is the crossfade's trigger."""
    sections = skin()
    pattern, children = webparser(sections)
    trigger = sections["MeasureFrameNumber"]
    assert 'CommandMeasure MeasureFade "Execute 1"' in trigger["OnChangeAction"]
    assert "FileDate" not in decode(INI) and "FileView" not in decode(INI)
    regex = pcre_to_python(pattern)
    add_segment(ctx, 0, 9)
    w = DisplayWriter(ctx)
    seen, shown = [], []
    current = ctx.cfg.output_dir / "current_frame.png"
    for _ in range(10):
        frame_ticks(w, clock, 1, fps=10.0)            # as the display's clock ticks
        raw = (ctx.cfg.output_dir / "status.json").read_text(encoding="utf-8")
        seen.append(child_value(regex.search(raw), trigger))
        shown.append(current.stat().st_ino)
    # every tick showed a new frame, and every new frame came with a new trigger value
    assert len(set(shown)) == 10 and len(set(seen)) == 10
    assert [int(v) for v in seen] == list(range(int(seen[0]), int(seen[0]) + 10))


# ---------------------------------------------------------------- the installer

PYTHON = r"C:\Program Files\Dream Window\.venv\Scripts\python.exe"


def windows_config(data_dir: str, config_file: str | None = None):
    cfg = config.parse("[display]\nfps = 5.0\n")
    cfg.system.data_dir = data_dir
    cfg.display.output_dir = data_dir.rstrip("\\") + r"\output"
    cfg.file = PureWindowsPath(config_file) if config_file else None
    return cfg


def command_line_to_argv(line: str) -> list[str]:
    """How a Windows program (the MS C runtime, CommandLineToArgvW) splits its command
    line: the program name up to its closing quote, then 2n backslashes before a quote
    are n and the quote delimits, 2n+1 are n and a literal quote."""
    line = line.lstrip()
    if line.startswith('"'):
        end = line.index('"', 1)
        argv, i = [line[1:end]], end + 1
    else:
        end = len(line.split()[0])
        argv, i = [line[:end]], end
    s, n = line, len(line)
    while True:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            return argv
        arg, quoted = [], False
        while i < n and (quoted or s[i] not in " \t"):
            if s[i] == "\\":
                j = i
                while j < n and s[j] == "\\":
                    j += 1
                if j < n and s[j] == '"':
                    arg.append("\\" * ((j - i) // 2))
                    if (j - i) % 2:
                        arg.append('"')
                        j += 1
                    i = j
                else:
                    arg.append("\\" * (j - i))
                    i = j
            elif s[i] == '"':
                if quoted and i + 1 < n and s[i + 1] == '"':
                    arg.append('"')
                    i += 2
                else:
                    quoted = not quoted
                    i += 1
            else:
                arg.append(s[i])
                i += 1
        argv.append("".join(arg))


def rainmeter_run(action: str) -> tuple[str, str]:
    """Rainmeter's [program args] action (CommandHandler::RunCommand): a quoted first
    token is the file, the rest its parameters."""
    command = action.strip()
    if command.startswith('"'):
        end = command.index('"', 1)
        return command[1:end], command[end + 1:]
    file, _, args = command.partition(" ")
    return file, args


@pytest.mark.parametrize("data_dir,config_file", [
    (r"C:\Users\Zoë Q\AppData\Local\dream data", None),
    ("D:\\", r"C:\Users\Zoë Q\My Configs\dreamd.toml"),
])
def test_the_installer_writes_windows_paths_the_commands_survive(tmp_path, data_dir,
                                                                config_file):
    cfg = windows_config(data_dir, config_file)
    skins = tmp_path / "Rainmeter Skins"
    folder = rainmeter.install(cfg, skins, python=PYTHON)
    inc = folder / "@Resources" / "Variables.inc"
    assert inc.read_bytes().startswith(b"\xff\xfe")          # UTF-16 LE, BOM
    assert (folder / "DreamWindow.ini").read_bytes() == INI.read_bytes()
    assert not list(folder.rglob("*.md")) and not list(folder.rglob("*.ps1"))
    sections = skin(inc)
    v = sections["Variables"]
    assert (v["DataDir"], v["OutputDir"], v["Python"], v["PythonW"]) == (
        data_dir, data_dir.rstrip("\\") + r"\output", PYTHON,
        PYTHON.replace("python.exe", "pythonw.exe"))
    assert v["AutoStart"] == "1" and int(v["FadeSteps"]) * int(v["FadeStepMs"]) < 1000 / 5
    head = (["--config", config_file] if config_file else []) + ["--data-dir", data_dir]
    # the buttons: RunCommand runs Program + " " + Parameter (no cmd.exe in between)
    for name, tail in [("MeasureRunPause", ["pause", "--reason", "paused from Rainmeter"]),
                       ("MeasureRunResume", ["resume"]), ("MeasureRunTheme", ["theme", "next"]),
                       ("MeasureRunDenoiseUp", ["set", "generation.denoise=0.40"]),
                       ("MeasureRunStop", ["stop"])]:
        keys = sections[name]
        line = substitute(keys["Program"] + " " + keys["Parameter"], v)
        line = re.sub(r"\[MeasureDenoise\w+:2\]", "0.40", line)
        assert command_line_to_argv(line) == [PYTHON, "-m", "dreamd", *head, *tail], name
    # the launcher: Rainmeter's [file args] action, run without a console
    launch = re.search(r'\]\[("#PythonW#".*?)\]$', sections["MeasureMode"]["IfTrueAction4"])
    file, args = rainmeter_run(substitute(launch.group(1), v))
    assert file == v["PythonW"]
    assert command_line_to_argv('"x" ' + args)[1:] == ["-m", "dreamd", *head, "run"]
    # the right-click menu stops the daemon (through `dreamd stop`) and starts it again,
    # each noting the launch done so the launcher does not start it behind the user's back
    menu = sections["Rainmeter"]
    assert menu["ContextAction3"] == ('[!SetVariable Launched 1]'
                                      '[!CommandMeasure MeasureRunStop "Run"]')
    start = re.fullmatch(r'\[!SetVariable Launched 1\]\[("#PythonW#".*?)\]',
                         menu["ContextAction4"])
    file, args = rainmeter_run(substitute(start.group(1), v))
    assert file == v["PythonW"]
    assert command_line_to_argv('"x" ' + args)[1:] == ["-m", "dreamd", *head, "run"]
    # the images and status.json are read from the output dir
    assert substitute(sections["MeterCurrent"]["ImageName"], v) == \
        data_dir.rstrip("\\") + r"\output\current_frame.png"


def test_the_skins_folder_comes_from_rainmeter_ini_then_documents(tmp_path):
    appdata = tmp_path / "AppData"
    (appdata / "Rainmeter").mkdir(parents=True)
    env = {"APPDATA": str(appdata), "USERPROFILE": r"C:\Users\Zoë Q"}
    assert rainmeter.skins_dir(environ=env, winreg=None, windows=True) == \
        PureWindowsPath(r"C:\Users\Zoë Q\Documents\Rainmeter\Skins")
    (appdata / "Rainmeter" / "Rainmeter.ini").write_bytes(
        ("\ufeff[Rainmeter]\r\nSkinPath=%USERPROFILE%\\My Skins\\\r\n").encode("utf-16-le"))
    found = rainmeter.skins_dir(environ=env, windows=True)
    assert str(found).rstrip("\\/") == str(PureWindowsPath(r"C:\Users\Zoë Q\My Skins"))
    assert rainmeter.skins_dir("some/dir") == Path("some/dir")
    with pytest.raises(UsageError, match="--skins-dir"):
        rainmeter.skins_dir(windows=False)


def test_dreamd_rainmeter_install_from_the_command_line(tmp_path, dreamd_env):
    out = subprocess.run(dreamd_cmd("rainmeter", "install", "--skins-dir", str(tmp_path / "s"),
                                    "--no-autostart"),
                         env=dreamd_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    inc = tmp_path / "s" / "DreamWindow" / "@Resources" / "Variables.inc"
    v = read_ini(inc)["Variables"]
    assert v["DataDir"] == dreamd_env["DREAMD_DATA_DIR"] and v["AutoStart"] == "0"
    bare = subprocess.run(dreamd_cmd("rainmeter", "install"), env=dreamd_env,
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "--skins-dir" in bare.stderr


# ---------------------------------------------------------------- Windows install path

def test_the_windows_install_script_does_what_the_readme_says():
    script = (SKIN / "install.ps1").read_bytes().decode("ascii")
    assert "\n" not in script.replace("\r\n", "")          # CRLF throughout
    for needle in ("py -3 -m venv", r"Scripts\python.exe", "-m pip install --quiet -e",
                   '"rainmeter", "install"', '"--skins-dir"', '"--data-dir"',
                   "--no-autostart", "$LASTEXITCODE"):
        assert needle in script, needle
    section = (REPO / "docs" / "windows.md").read_text(encoding="utf-8")
    for command in (r"py -3 -m venv .venv", r".venv\Scripts\python -m pip install -e .",
                    r".venv\Scripts\dreamd run", r".venv\Scripts\dreamd rainmeter install",
                    r"rainmeter_skin\install.ps1"):
        assert command in section, command
    # the commands the README gives exist: argparse knows them
    from dreamd.cli import build_parser
    for argv in (["run", "--duration", "1"], ["rainmeter", "install", "--skins-dir", "x"]):
        build_parser().parse_args(argv)


def test_make_rmskin_builds_a_package_rainmeter_accepts(tmp_path):
    import struct
    import zipfile

    out = rainmeter.package(tmp_path / "dist" / "DreamWindow.rmskin")
    raw = out.read_bytes()
    size, flags, key = struct.unpack("<qB7s", raw[-16:])
    assert (size, flags, key) == (len(raw) - 16, 0, b"RMSKIN\0")   # DialogInstall's check
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        options = zf.read("RMSKIN.ini").decode("ascii")
        assert zf.read("Skins\\DreamWindow\\DreamWindow.ini") == INI.read_bytes()
    assert names[0] == "RMSKIN.ini" and "Skins\\DreamWindow\\@Resources\\Variables.inc" in names
    assert "Load=DreamWindow\\DreamWindow.ini" in options
    assert "VariableFiles=DreamWindow\\@Resources\\Variables.inc" in options
    assert "\nrmskin:" in (REPO / "Makefile").read_text()
