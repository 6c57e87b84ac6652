"""Every google.rpc.ErrorInfo reason the services can send is listed in the
ErrorReason enum of the proto of the service that sends it.

The reasons are collected statically, with `ast`, from state_service/,
agent_service/ and shared_runtime/ (whose reasons both services send):
- a `reason=` keyword of any call (a string literal, or a guarded pass-through
  `x if x in CONSTANT else "LITERAL"` of a module-level tuple of literals),
- a `default_reason = "..."` (or `reason = "..."`) in a class body, counted
  where that class is instantiated without `reason=`,
- an assignment to an attribute named `reason`.

The collector fails loudly on anything it cannot resolve to literals (a
computed reason, a ServiceError class used other than by calling, raising,
catching or subclassing it), so it cannot silently miss a reason; the few
places that only carry a reason along (the error base class, the clients'
exceptions) are named in PASS_THROUGH with the reason why.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent_service.turns import FORWARDED_EXHAUSTED, FORWARDED_NOT_FOUND
from statecar.agent.v1 import agent_service_pb2
from statecar.state.v1 import state_service_pb2

ROOT = Path(__file__).resolve().parent.parent
BASE_CLASS = "ServiceError"
# package directory -> the services that send what its code raises
SENDERS = {
    "state_service": ("state",),
    "agent_service": ("agent",),
    "shared_runtime": ("state", "agent"),
}
PROTO_REASONS = {
    "state": set(state_service_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"},
    "agent": set(agent_service_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"},
}
# (file, enclosing function) -> why a non-literal reason there sends nothing new
PASS_THROUGH = {
    ("shared_runtime/errors.py", "ServiceError.__init__"): (
        "stores the reason= keyword or the class default, both collected at their source"
    ),
    ("shared_runtime/errors.py", "ServiceError.to_status"): "puts self.reason into the ErrorInfo",
    ("state_service/client/errors.py", "StateServiceError.__init__"): (
        "a client-side exception: holds a reason the state service sent"
    ),
    ("agent_service/client.py", "AgentServiceError.__init__"): (
        "a client-side exception: holds a reason the agent service sent"
    ),
}


@dataclass
class Module:
    path: str
    tree: ast.Module
    # name -> string values of a module-level tuple/list/set/frozenset of literals
    constants: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class ErrorClass:
    name: str
    bases: list[str]
    default: str | None  # None: inherited


@dataclass
class Found:
    reasons: dict[str, set[str]] = field(default_factory=dict)  # reason -> where
    problems: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.reasons.setdefault(reason, set()).add(where)


def _modules() -> Iterator[Module]:
    for package in SENDERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            module = Module(relative, ast.parse(path.read_text(), relative))
            for node in module.tree.body:
                if isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    values = _literal_strings(node.value)
                    for target in targets:
                        if isinstance(target, ast.Name) and values is not None:
                            module.constants[target.id] = values
            yield module


def _literal_strings(node: ast.expr | None) -> set[str] | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1:
        if node.func.id in ("frozenset", "set", "tuple"):
            return _literal_strings(node.args[0])
    if isinstance(node, ast.Tuple | ast.List | ast.Set) and node.elts:
        values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
        if len(values) == len(node.elts) and all(isinstance(v, str) for v in values):
            return {str(v) for v in values}
    return None


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _scope(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str:
    names = []
    current: ast.AST | None = node
    while current is not None:
        if isinstance(current, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(current.name)
        current = parents.get(current)
    return ".".join(reversed(names))


def _error_classes(modules: list[Module]) -> dict[str, ErrorClass]:
    """Every class under the three packages deriving from ServiceError, by name."""
    classes: dict[str, ErrorClass] = {}
    for module in modules:
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.ClassDef):
                continue
            default = None
            for statement in node.body:
                if isinstance(statement, ast.Assign | ast.AnnAssign):
                    targets = (
                        statement.targets
                        if isinstance(statement, ast.Assign)
                        else [statement.target]
                    )
                    if any(_name(t) in ("default_reason", "reason") for t in targets):
                        value = statement.value
                        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                            raise AssertionError(
                                f"{module.path}:{statement.lineno}: class {node.name}'s "
                                "reason default is not a string literal"
                            )
                        default = value.value
            bases = [b for b in (_name(base) for base in node.bases) if b is not None]
            classes[node.name] = ErrorClass(node.name, bases, default)

    def is_error(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name == BASE_CLASS:
            return True
        known = classes.get(name)
        return (
            known is not None
            and name not in seen
            and any(is_error(base, seen | {name}) for base in known.bases)
        )

    return {name: cls for name, cls in classes.items() if is_error(name)}


def _default_reason(name: str, classes: dict[str, ErrorClass]) -> str:
    cls = classes[name]
    if cls.default is not None:
        return cls.default
    for base in cls.bases:
        if base in classes:
            return _default_reason(base, classes)
    raise AssertionError(f"error class {name} has no reason default")


def _resolve(node: ast.expr, module: Module) -> set[str] | None:
    """The literal reasons an expression can take; None if not resolvable."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        values: set[str] = set()
        for branch in (node.body, node.orelse):
            resolved = _resolve(branch, module)
            if resolved is None:
                resolved = _guarded(branch, node.test, module)
            if resolved is None:
                return None
            values |= resolved
        return values
    return None


def _guarded(branch: ast.expr, test: ast.expr, module: Module) -> set[str] | None:
    """`x` in `x if x in CONSTANT else ...`: the constant's literals."""
    if (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.In)
        and ast.dump(test.left) == ast.dump(branch)
        and isinstance(test.comparators[0], ast.Name)
    ):
        return module.constants.get(test.comparators[0].id)
    return None


def _collect(module: Module, classes: dict[str, ErrorClass], found: Found) -> None:
    parents = _parents(module.tree)
    for node in ast.walk(module.tree):
        where = f"{module.path}:{getattr(node, 'lineno', 0)}"
        scope = _scope(node, parents)
        if isinstance(node, ast.Call):
            keyword = next((k for k in node.keywords if k.arg == "reason"), None)
            callee = _name(node.func)
            if keyword is not None:
                resolved = _resolve(keyword.value, module)
                if resolved is not None:
                    for reason in resolved:
                        found.add(reason, where)
                elif (module.path, scope) not in PASS_THROUGH:
                    found.problems.append(f"{where}: reason= is not a literal")
            elif callee in classes:
                found.add(_default_reason(callee, classes), where)
            if any(k.arg is None for k in node.keywords) and callee in classes:
                found.problems.append(f"{where}: **kwargs to {callee} may hide a reason")
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in (
                    "reason",
                    "default_reason",
                ):
                    resolved = _resolve(node.value, module) if node.value else None
                    if resolved is not None:
                        for reason in resolved:
                            found.add(reason, where)
                    elif (module.path, scope) not in PASS_THROUGH:
                        found.problems.append(f"{where}: .{target.attr} set to a non-literal")
        elif isinstance(node, ast.Name | ast.Attribute) and _name(node) in classes:
            if not _plain_use(node, parents):
                found.problems.append(
                    f"{where}: {_name(node)} used other than by calling, raising, catching "
                    "or subclassing it; its reasons cannot be traced"
                )


def _plain_use(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether a reference to an error class is one the collector accounts for."""
    parent = parents.get(node)
    if isinstance(node, ast.Name) and isinstance(parent, ast.Attribute):
        return True  # the module part of module.Class; the Attribute is checked
    if isinstance(parent, ast.Call) and parent.func is node:
        return True
    if isinstance(parent, ast.ClassDef) and node in parent.bases:
        return True
    if isinstance(parent, ast.ExceptHandler) and parent.type is node:
        return True
    if isinstance(parent, ast.Tuple):
        # except (A, B): / isinstance(x, (A, B))
        grand = parents.get(parent)
        if isinstance(grand, ast.ExceptHandler) or _isinstance_call(grand):
            return True
    if _isinstance_call(parent):
        return True
    # an annotation: `x: ServiceError`, `-> ServiceError`, `Callable[[], ServiceError] | None`
    child: ast.AST = node
    while isinstance(parent, ast.Subscript | ast.BinOp | ast.List | ast.Tuple):
        child, parent = parent, parents.get(parent)
    if isinstance(parent, ast.arg | ast.AnnAssign):
        return parent.annotation is child
    if isinstance(parent, ast.FunctionDef | ast.AsyncFunctionDef):
        return parent.returns is child
    return False


def _isinstance_call(node: ast.AST | None) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
    )


def sent_reasons() -> dict[str, dict[str, set[str]]]:
    """service ("state" / "agent") -> reason -> the places that send it."""
    modules = list(_modules())
    classes = _error_classes(modules)
    by_service: dict[str, dict[str, set[str]]] = {"state": {}, "agent": {}}
    problems: list[str] = []
    for module in modules:
        found = Found()
        _collect(module, classes, found)
        problems.extend(found.problems)
        for service in SENDERS[module.path.split("/", 1)[0]]:
            for reason, where in found.reasons.items():
                by_service[service].setdefault(reason, set()).update(where)
    assert not problems, "reasons the collector cannot resolve:\n" + "\n".join(problems)
    return by_service


def test_the_collector_finds_the_known_senders() -> None:
    # Guards the collector itself: a literal keyword, a class default used by
    # instantiation, a default set in a service's own error class, and a
    # guarded pass-through are each found.
    reasons = sent_reasons()
    assert "ETAG_MISMATCH" in reasons["state"]  # EtagMismatch(): class default
    assert "SESSION_NOT_FOUND" in reasons["state"]  # reason= literal
    assert "REPLICATION_TIMEOUT" in reasons["state"]  # a state_service error class
    assert "BACKEND_TIMEOUT" in reasons["agent"]  # shared_runtime: both services
    assert "CONCURRENT_TURN" in reasons["agent"]
    assert "WORKFLOW_NOT_FOUND" in reasons["agent"]


def test_every_reason_sent_is_listed_in_the_senders_proto() -> None:
    missing = [
        f"{service}: {reason} (sent at {', '.join(sorted(where))})"
        for service, reasons in sent_reasons().items()
        for reason, where in sorted(reasons.items())
        if reason not in PROTO_REASONS[service]
    ]
    assert not missing, "add these to the ErrorReason enum of the service's proto:\n" + "\n".join(
        missing
    )


def test_the_proto_lists_no_reason_the_code_never_sends() -> None:
    sent = sent_reasons()
    stale = [
        f"{service}: {reason}"
        for service, listed in PROTO_REASONS.items()
        for reason in sorted(listed - set(sent[service]))
    ]
    assert not stale, "remove from ErrorReason (or send them):\n" + "\n".join(stale)


def test_forwarded_state_reasons_are_ones_the_state_service_sends() -> None:
    forwarded = set(FORWARDED_NOT_FOUND) | set(FORWARDED_EXHAUSTED)
    assert forwarded <= set(sent_reasons()["state"])


def test_the_reason_enums_follow_aip_193() -> None:
    # The value names are the reason strings themselves: UPPER_SNAKE_CASE, at
    # most 63 characters, and each value documented in the proto.
    for service, reasons in PROTO_REASONS.items():
        for reason in reasons:
            assert reason.replace("_", "").isalnum() and reason.isupper(), (service, reason)
            assert len(reason) <= 63, (service, reason)
