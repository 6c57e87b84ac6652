"""The declared boundary between the two services.

agent_service may use the state service only through its client
(`state_service.client`) and the runtime both share (`shared_runtime`); the
documented exceptions are the CLI's `statecar up`, which starts an embedded
state service in its own process, and AGENT_SERVICE_STATE_IN_PROCESS, which
runs the state engine inside the agent process (agent_service/server.py
imports it only then, so an agent with a remote state service never loads
it). shared_runtime depends on neither service.
Checked twice: statically (every import statement, lazy ones included) and
at run time (what importing the agent service really loads).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module of agent_service -> state_service modules it may import beyond the client
EXCEPTIONS = {
    "agent_service/cli.py": {"state_service.server", "state_service.settings"},
    "agent_service/server.py": {"state_service.in_process", "state_service.settings"},
}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_agent_service_uses_only_the_state_client_and_the_shared_runtime() -> None:
    offending = []
    for path in sorted((ROOT / "agent_service").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        allowed = EXCEPTIONS.get(relative, set())
        for line, module in _imports(path):
            if not _within(module, "state_service") or module == "state_service":
                continue
            if _within(module, "state_service.client") or module in allowed:
                continue
            if any(_within(module, a) for a in allowed):
                continue
            offending.append(f"{relative}:{line} imports {module}")
    assert not offending, "\n".join(offending)


def test_shared_runtime_depends_on_neither_service() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "shared_runtime").rglob("*.py"))
        for line, module in _imports(path)
        if _within(module, "state_service") or _within(module, "agent_service")
    ]
    assert not offending, "\n".join(offending)


def test_state_client_depends_only_on_itself_and_the_shared_runtime() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "state_service" / "client").rglob("*.py"))
        for line, module in _imports(path)
        if _within(module, "state_service")
        and module != "state_service"
        and not _within(module, "state_service.client")
    ]
    assert not offending, "\n".join(offending)


def test_importing_the_agent_service_loads_only_the_state_client() -> None:
    probe = (
        "import sys, agent_service.server, agent_service.servicer, agent_service.client;"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('state_service'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    unexpected = [
        m for m in loaded if m != "state_service" and not _within(m, "state_service.client")
    ]
    assert not unexpected, unexpected
