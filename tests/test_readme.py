"""The README documents every setting the services read."""

from __future__ import annotations

from pathlib import Path

from agent_service.settings import AgentServiceSettings
from state_service.settings import StateServiceSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_state_setting_is_documented() -> None:
    missing = [
        name
        for name in StateServiceSettings.model_fields
        if f"`STATE_SERVICE_{name.upper()}`" not in README
    ]
    assert missing == []


def test_every_agent_setting_is_documented() -> None:
    missing = [
        name
        for name in AgentServiceSettings.model_fields
        if f"`AGENT_SERVICE_{name.upper()}`" not in README
    ]
    assert missing == []
