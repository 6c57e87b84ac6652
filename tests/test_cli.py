"""`statecar up` and `statecar chat` end to end, as a user runs them: real
processes, the embedded Redis, the offline model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from state_service.storage.embedded import free_port
from tests.patience import patience

pytestmark = pytest.mark.slow

STATECAR = [sys.executable, "-m", "agent_service.cli"]


def _statecar(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STATECAR, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=patience(60),
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def test_up_then_chat_history_sessions_and_ctrl_c(tmp_path: Path) -> None:
    agent, state = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    up = subprocess.Popen(
        [*STATECAR, "up", "--agent-listen", agent, "--state-listen", state],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "COLUMNS": "200",
            "STATE_SERVICE_METRICS_PORT": "0",
            "AGENT_SERVICE_METRICS_PORT": "0",
        },
    )
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + patience(60)
        banner = ""
        while "statecar is up" not in banner:
            assert time.monotonic() < deadline and up.poll() is None, banner
            banner += up.stdout.readline()

        said = _statecar(
            "chat", "--agent-target", agent, "--session", "demo",
            "My name is Grace and my cat is called Turing.", cwd=tmp_path,
        )  # fmt: skip
        assert said.returncode == 0, said.stderr
        assert said.stdout.startswith("(offline model)")

        asked = _statecar(
            "chat", "--agent-target", agent, "--session", "demo",
            "What is my cat called?", cwd=tmp_path,
        )  # fmt: skip
        assert asked.returncode == 0, asked.stderr
        assert "Turing" in asked.stdout
        assert "context 2 items" in asked.stdout

        tool = _statecar(
            "chat", "--agent-target", agent, "--session", "demo", "What is 6 * 7?", cwd=tmp_path
        )
        assert "calculate" in tool.stdout and "42" in tool.stdout

        history = _statecar("history", "--state-target", state, "--session", "demo", cwd=tmp_path)
        assert history.returncode == 0, history.stderr
        assert "8 items" in history.stdout
        assert "What is my cat called?" in history.stdout

        lines = _statecar(
            "history", "--state-target", state, "--session", "demo", "--json", cwd=tmp_path
        ).stdout.splitlines()
        assert len(lines) == 8 and [json.loads(line)["seq"] for line in lines] == list(range(1, 9))

        piped = _statecar(
            "chat", "--agent-target", agent, "--session", "piped", "-",
            cwd=tmp_path, stdin="Remember: the demo is on Friday\n",
        )  # fmt: skip
        assert piped.returncode == 0, piped.stderr
        assert "save_note" in piped.stdout

        sessions = _statecar("sessions", "--state-target", state, cwd=tmp_path)
        assert "demo" in sessions.stdout and "2 sessions" in sessions.stdout

        missing = _statecar(
            "chat", "--agent-target", agent, "--session", "bad id!", "hi", cwd=tmp_path
        )
        assert missing.returncode == 1
        assert "INVALID_ARGUMENT" in missing.stderr

        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=30)
        assert up.returncode == 0, rest
        assert "stopped" in rest
        # The embedded Redis kept the data in the working directory.
        assert (tmp_path / ".statecar" / "state").is_dir()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_commands_say_how_to_start_the_stack_when_nothing_answers(tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    for args in (
        ("chat", "--agent-target", nobody, "--session", "s", "hi"),
        ("history", "--state-target", nobody, "--session", "s"),
        ("sessions", "--state-target", nobody),
        ("agents", "--agent-target", nobody),
    ):
        result = _statecar(*args, cwd=tmp_path)
        assert result.returncode == 1, result
        assert nobody in result.stderr and "make run" in result.stderr
        assert "Traceback" not in result.stderr


def test_help_does_not_import_the_servers() -> None:
    probe = (
        "import sys, agent_service.cli;"
        "print(sorted(m for m in ('agents', 'agent_service.server', 'state_service.server') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert loaded == "[]"
