"""The agents file: YAML and TOML, defaults, and refusals that name the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent_service.config import ConfigError, load_config
from tests.conftest import write_agents_file

YAML = """
default_agent: billing
agents:
  - name: triage
    description: Routes.
    tools: [current_time]
    handoffs: [billing]
  - name: billing
    model: openai:gpt-4.1-mini
    token_budget: 2000
"""

TOML = """
default_agent = "billing"

[[agents]]
name = "triage"
description = "Routes."
tools = ["current_time"]
handoffs = ["billing"]

[[agents]]
name = "billing"
model = "openai:gpt-4.1-mini"
token_budget = 2000
"""


@pytest.mark.parametrize(("text", "suffix"), [(YAML, ".yaml"), (TOML, ".toml")])
def test_yaml_and_toml_say_the_same(tmp_path: Path, text: str, suffix: str) -> None:
    config = load_config(write_agents_file(tmp_path, text, suffix))
    assert config.default == "billing"
    assert [a.name for a in config.agents] == ["triage", "billing"]
    triage, billing = config.agents
    assert triage.tools == ["current_time"] and triage.handoffs == ["billing"]
    assert triage.token_budget == 4000 and triage.model is None
    assert billing.model == "openai:gpt-4.1-mini" and billing.token_budget == 2000


def test_no_file_means_one_assistant_with_every_tool() -> None:
    config = load_config(None)
    assert config.default == "assistant"
    assert set(config.agents[0].tools) == {"calculate", "current_time", "list_notes", "save_note"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("agents: []", "at least 1"),
        ("agents:\n  - name: a\n    tools: [rm_rf]", "unknown tools ['rm_rf']"),
        ("agents:\n  - name: a\n    handoffs: [b]", "unknown agents ['b']"),
        ("agents:\n  - name: a\n  - name: a", "defined twice"),
        ("default_agent: z\nagents:\n  - name: a", "default_agent 'z'"),
        ("agents:\n  - name: a\n    model: claude", "not offline, openai"),
        ("agents:\n  - name: Bad Name", "name"),
        ("agents:\n  - name: a\n    colour: red", "colour"),
        ("agents: [", "not valid YAML"),
    ],
)
def test_invalid_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write_agents_file(tmp_path, text))
    assert message in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agents config"):
        load_config(tmp_path / "nope.yaml")


def test_agent_service_exits_with_the_config_error(tmp_path: Path) -> None:
    bad = write_agents_file(tmp_path, "agents:\n  - name: a\n    tools: [rm_rf]")
    done = subprocess.run(
        [sys.executable, "-m", "agent_service", "--agents-config", str(bad), "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "unknown tools ['rm_rf']" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_openai_agent_without_an_endpoint_is_refused_at_start(tmp_path: Path) -> None:
    config = write_agents_file(tmp_path, "agents:\n  - name: a\n    model: openai")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent_service",
            "--agents-config",
            str(config),
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert "no endpoint is configured" in done.stderr
