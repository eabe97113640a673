"""The docs' examples work from a clone: every `turngate ...` command they show exists with the options
they give it, every data path is the shared folder beside the clone (and is there when it is), every
YAML configuration and deploy/turngate.example.yaml load as settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from service.cli import app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "critic_models/default/REPORT.md"]
SHARED = ROOT.parent / "shared" / "data"


def code_of(doc: Path) -> list[str]:
    """Fenced blocks and inline code spans."""
    text = doc.read_text()
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"`([^`]+)`", rest)


def commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for code in code_of(doc):
            for line in code.replace("\n", " ").split("&&") if "\n" not in code.strip() else code.splitlines():
                line = line.split(" # ")[0].strip()
                match = re.search(r"(?:^|\$ |\S+=\S+ )turngate ((?:--debug )?[a-z].*)", line)
                if match:
                    found.append((doc.name, match.group(1)))
    return found


COMMANDS = commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15, COMMANDS  # the parser below still finds them


@pytest.mark.parametrize("doc, line", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_each_command_and_option_exists(doc, line):
    words = [w for w in re.sub(r"[\[\]|]", " ", line).split() if w]
    command = typer.main.get_command(app)
    path = []
    while words and words[0] in getattr(command, "commands", {}):  # a group (typer vendors its own click)
        path.append(words[0])
        command = command.commands[words.pop(0)]
    assert path, f"{doc}: `turngate {line}`: no such command"
    options = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"{doc}: `turngate {' '.join(path)}` has no option {word}"


def test_data_paths_are_the_shared_folder_beside_the_clone():
    for doc in DOCS:
        text = doc.read_text()
        assert "/work/" not in text, f"{doc.name} names a path of one machine"
        for path in re.findall(r"\.\./shared/data[^\s`\]\)]*", text):
            if SHARED.is_dir():
                assert list(ROOT.glob(path)) or (ROOT / path).exists(), f"{doc.name}: {path} is not there"


def test_the_docs_say_where_the_data_comes_from():
    text = (ROOT / "docs/critic.md").read_text()
    for source in ("τ-bench", "τ²-bench", "MIT", "reward-bench", "bon_eval", "Apache-2.0", "BFCL"):
        assert source in text, source


def yaml_configs() -> list[tuple[str, str]]:
    return [(doc.name, block) for doc in DOCS for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)
            if block.lstrip().startswith(("routes:", "#"))]


@pytest.mark.parametrize("doc, block", yaml_configs())
def test_yaml_configurations_in_the_docs_load(tmp_path, monkeypatch, doc, block):
    config = tmp_path / "turngate.yaml"
    config.write_text(block)
    monkeypatch.setenv("TURNGATE_CONFIG", str(config))
    monkeypatch.setenv("TURNGATE_DEV", "1")  # the examples' keys are placeholders (`sk-...`)
    assert Settings().routes


def test_the_example_config_loads_and_carries_the_domain_rule(monkeypatch):
    monkeypatch.setenv("TURNGATE_CONFIG", str(ROOT / "deploy/turngate.example.yaml"))
    routes = Settings().routes
    assert [r.mode for r in routes] == ["rank", "passthrough"]
    assert routes[0].policy.guidance == "Do not take an action the user has not explicitly confirmed."
