"""The configuration reference (docs/configuration.md) is generated from the
settings classes, is fresh, and names the flags the commands really take."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic_settings import BaseSettings

from tools.settings_docs import CONFIGURATION, SERVICES, configuration_text, flag


def test_the_configuration_reference_is_fresh() -> None:
    assert CONFIGURATION.read_text() == configuration_text(), "run `make docs`"


@pytest.mark.parametrize(("command", "settings"), [(c, s) for _, c, s in SERVICES])
def test_every_documented_flag_is_a_real_flag(command: str, settings: type[BaseSettings]) -> None:
    module = command.replace("-", "_")
    usage = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"COLUMNS": "400", "PATH": ""},
    ).stdout
    missing = [
        flag(name, field)
        for name, field in settings.model_fields.items()
        if f"{flag(name, field)} " not in usage
    ]
    assert missing == []
