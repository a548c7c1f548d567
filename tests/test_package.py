"""The installed package: its commands, the presets it ships, and what `pip install .` puts in it."""

import importlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

from megamoe.config import ConfigError, load_config, presets
from runs import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_tool_is_a_command_that_answers_help(capsys):
    tools = {f"megamoe.cli.{p.stem}:main" for p in (REPO / "megamoe" / "cli").glob("*.py") if p.stem != "__init__"}
    assert tools <= set(SCRIPTS.values()) and SCRIPTS["megamoe-train"] == "megamoe.train.__main__:cli"
    for name, target in SCRIPTS.items():
        module = target.partition(":")[0]
        main = getattr(importlib.import_module(module), "main")  # megamoe-train's cli() runs main, then exits
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {name} ")


def test_presets_load_by_name_from_any_directory(tmp_path, monkeypatch):
    assert set(presets()) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny-cpu") == load_config(REPO / "configs" / "tiny-cpu.yaml")
    with pytest.raises(ConfigError, match="or a preset name: olmoe-1b-7b, olmoe-1b-7b-sft, tiny-cpu"):
        load_config("tiny-gpu")


def test_wheel_ships_the_presets_and_the_commands(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("megamoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"megamoe/configs/{p}.yaml" for p in presets()} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert all(f"{name} = {target}" in entry_points for name, target in SCRIPTS.items())
