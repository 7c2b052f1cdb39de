"""Config: defaults, lookup order, data-dir override, and errors that name the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dreamd import config
from dreamd.errors import ConfigError
from tests.conftest import dreamd_cmd


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_no_file(dreamd_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load()
    assert cfg.file is None
    assert cfg.generation.backend == "procedural"
    assert cfg.generation.resolution == [512, 256]
    assert cfg.display.fps == 4.0
    assert cfg.prompts.themes[0].name == "ethereal"
    assert all(src.startswith("default") for src in cfg.sources.values())
    assert cfg.db_path == Path(cfg.system.data_dir) / "dreamd.db"


def test_lookup_order(dreamd_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = Path(config.user_config_file())
    user.parent.mkdir(parents=True)
    write(user, "[display]\nfps = 1.0\n")
    assert config.load().display.fps == 1.0                       # user config dir
    write(tmp_path / "dreamd.toml", "[display]\nfps = 2.0\n")
    assert config.load().display.fps == 2.0                       # ./dreamd.toml wins
    env_file = write(tmp_path / "env.toml", "[display]\nfps = 3.0\n")
    monkeypatch.setenv("DREAMD_CONFIG", str(env_file))
    assert config.load().display.fps == 3.0                       # $DREAMD_CONFIG wins
    explicit = write(tmp_path / "explicit.toml", "[display]\nfps = 5.0\n")
    cfg = config.load(explicit)
    assert cfg.display.fps == 5.0                                 # --config wins
    assert cfg.sources["display.fps"] == f"file:{explicit}"
    assert cfg.sources["display.buffer_target_seconds"] == "default"


def test_missing_explicit_file_is_an_error(dreamd_env, tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        config.load(tmp_path / "nope.toml")


def test_data_dir_override_order(dreamd_env, tmp_path, monkeypatch):
    f = write(tmp_path / "c.toml", '[system]\ndata_dir = "from-file"\n')
    cfg = config.load(f)
    assert cfg.data_dir == (tmp_path / "from-file").resolve()     # relative to the file
    monkeypatch.setenv("DREAMD_DATA_DIR", str(tmp_path / "from-env"))
    assert config.load(f).data_dir == tmp_path / "from-env"
    cfg = config.load(f, data_dir=tmp_path / "from-flag")
    assert cfg.data_dir == tmp_path / "from-flag"
    assert cfg.sources["system.data_dir"] == "--data-dir"


@pytest.mark.parametrize("text, message", [
    ("[generation]\ndenoyse = 0.3\n", "unknown key 'generation.denoyse'; did you mean "
                                      "generation.denoise"),
    ("[genration]\n", r"unknown section \[genration\]; did you mean \[generation\]"),
    ('[display]\nfps = "fast"\n', "display.fps = 'fast' is invalid: expected a number"),
    ("[display]\nfps = 500\n", "display.fps = 500.0 is invalid: expected a value between 0.1 "
                               "and 60"),
    ("[generation]\ninterpolation_frames = 2.5\n", "generation.interpolation_frames = 2.5 is "
                                                   "invalid: expected an integer"),
    ("[generation]\nbackend = \"comfy\"\n", "generation.backend = 'comfy' is invalid: expected "
                                            "one of 'procedural', 'comfyui', 'diffusers' "
                                            "\\(did you mean 'comfyui'\\?\\)"),
    ("[generation]\nresolution = [500, 256]\n", r"generation.resolution = \[500, 256\] is "
                                                "invalid: expected .*multiple of 8"),
    ("[cache]\nenabled = 1\n", "cache.enabled = 1 is invalid: expected true or false"),
    ("[comfyui]\nurls = [\"localhost:8188\"]\n", "comfyui.urls = .* expected http"),
    ("[[prompts.themes]]\nname = \"a\"\npostive = \"x\"\n",
     r"unknown key 'prompts.themes\[0\].postive'; did you mean prompts.themes\[0\].positive"),
    ("[prompts]\nthemes = []\n", r"prompts.themes = \[\] is invalid"),
    ("[display]\nmin_buffer_seconds = 40\nbuffer_target_seconds = 30\n",
     "display.min_buffer_seconds = 40 is invalid: expected a value no larger than "
     "display.buffer_target_seconds"),
    ("[display\nfps = 4\n", "not valid TOML"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    f = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=message) as info:
        config.check_file(f)
    assert str(f) in str(info.value)


@pytest.mark.parametrize("path", [r"C:\ComfyUI\models", r"C:\Users\me\ComfyUI\models"])
def test_a_windows_path_in_double_quotes_hints_at_single_quotes(tmp_path, dreamd_env, path):
    """TOML reads a backslash in double quotes as an escape, so a pasted Windows path
    breaks the file (`\\C` is no escape; `\\U` wants hex digits): the error says to write
    it in single quotes, and that advice, followed, gives the path the user meant."""
    f = write(tmp_path / "win.toml", f'[comfyui]\nmodels_dir = "{path}"\n')
    with pytest.raises(ConfigError) as info:
        config.check_file(f)
    message = str(info.value)
    assert "not valid TOML" in message and str(f) in message
    assert f"single quotes, '{path}'" in message
    fixed = write(tmp_path / "fixed.toml", f"[comfyui]\nmodels_dir = '{path}'\n")
    assert config.parse(fixed.read_text()).comfyui.models_dir == path
    cli = subprocess.run(dreamd_cmd("config", "check", str(f)), env=dreamd_env,
                         capture_output=True, text=True)
    assert cli.returncode == 2 and f"'{path}'" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


def test_a_toml_error_without_a_backslash_gets_no_path_hint(tmp_path):
    f = write(tmp_path / "bad.toml", '[comfyui]\nmodels_dir = "C:/ComfyUI/models\n')
    with pytest.raises(ConfigError) as info:
        config.check_file(f)
    assert "not valid TOML" in str(info.value) and "single quotes" not in str(info.value)


def test_themes_parse(tmp_path):
    f = write(tmp_path / "t.toml", '[[prompts.themes]]\nname = "sea"\npositive = "deep ocean"\n'
                                   '[[prompts.themes]]\nname = "fire"\npositive = "embers"\n'
                                   'negative = "blur"\n')
    cfg = config.check_file(f)
    assert [(t.name, t.positive, t.negative) for t in cfg.prompts.themes] == [
        ("sea", "deep ocean", ""), ("fire", "embers", "blur")]


def test_show_round_trips(dreamd_env, tmp_path):
    """`config show` prints TOML that is itself a valid config with the same values."""
    f = write(tmp_path / "c.toml", '[display]\nfps = 8.0\n[generation]\ndenoise = 0.45\n')
    cfg = config.load(f, data_dir=tmp_path / "d")
    again = config.parse(config.to_toml(cfg))
    assert config.flatten(again) == config.flatten(cfg)


def test_cli_check_and_show(dreamd_env, tmp_path):
    good = write(tmp_path / "good.toml", "[display]\nfps = 8.0\n")
    bad = write(tmp_path / "bad.toml", "[display]\nfsp = 8.0\n")
    ok = subprocess.run(dreamd_cmd("config", "check", str(good)), env=dreamd_env,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    no = subprocess.run(dreamd_cmd("config", "check", str(bad)), env=dreamd_env,
                        capture_output=True, text=True)
    assert no.returncode == 2
    assert "display.fsp" in no.stderr and "did you mean display.fps" in no.stderr
    show = subprocess.run(dreamd_cmd("--config", str(good), "config", "show"), env=dreamd_env,
                          capture_output=True, text=True)
    assert show.returncode == 0
    assert f"fps = 8.0  # file:{good}" in show.stdout
    assert "denoise = 0.3  # default" in show.stdout
    assert "data_dir" in show.stdout and "$DREAMD_DATA_DIR" in show.stdout


def test_daemon_refuses_invalid_config(dreamd_env, tmp_path):
    bad = write(tmp_path / "bad.toml", "[display]\nfps = -1\n")
    proc = subprocess.run(dreamd_cmd("--config", str(bad), "run", "--duration", "1"),
                          env=dreamd_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "display.fps = -1" in proc.stderr
    assert not (tmp_path / "data" / "dreamd.db").exists()


def test_a_value_of_the_wrong_type_names_the_type_in_plain_words(tmp_path):
    path = tmp_path / "dreamd.toml"
    path.write_text('[comfyui]\nurls = "http://127.0.0.1:8188"\n')
    with pytest.raises(ConfigError) as err:
        config.load(path, data_dir=tmp_path / "data")
    assert "expected a list of strings" in str(err.value), str(err.value)
