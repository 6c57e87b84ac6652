"""The `statecar` command line.

    statecar up                                # embedded Redis + state + agent service
    statecar chat --session S [--agent A] "message"   # "-" (or nothing): read stdin
    statecar fork --session S --before-seq N --new-session T ["message"]
    statecar approve S [--reject] [--all | APPROVAL_ID ...]   # no ids: list pending
    statecar history --session S
    statecar sessions
    statecar agents
    statecar export [--session S ...] [--output FILE]    # JSON Lines
    statecar import [FILE] [--from sqlite|sqlalchemy|redis-session|redis-json --source X]
    statecar erase --session S | --tenant T --yes

`up` reads the same STATE_SERVICE_* / AGENT_SERVICE_* environment as the
services; the other commands talk to running services (--agent-target,
--state-target, or STATECAR_AGENT_TARGET / STATECAR_STATE_TARGET) and present
STATECAR_TOKEN as a bearer token when it is set.

Only `up` imports the servers (and openai-agents, which takes seconds to
import); the other commands load the clients alone, so they start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent_service.client import (
    AgentClient,
    AgentServiceError,
    ChatResult,
    HandoffEvent,
    TextDelta,
    ToolCallFinished,
    ToolCallStarted,
)
from shared_runtime.items import item_text
from shared_runtime.process import StartupError
from state_service.client import StateClient, StateServiceError

DEFAULT_AGENT_TARGET = "127.0.0.1:50061"
DEFAULT_STATE_TARGET = "127.0.0.1:50051"
# How long a command waits for a connection before saying nothing answers.
CONNECT_TIMEOUT_SECONDS = 2.0

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


class Unreachable(Exception):
    """Nothing answers at a service's address (the message says what to do)."""


async def _require(client: AgentClient | StateClient, what: str, target: str, flag: str) -> None:
    if not await client.reachable(CONNECT_TIMEOUT_SECONDS):
        raise Unreachable(
            f"no {what} answers at {target}. Start the stack with `make run` (or `statecar "
            f"up`), or point {flag} at a running one"
        )


async def up(args: argparse.Namespace) -> int:
    from agent_service.config import ConfigError

    try:
        return await _up(args)
    except ConfigError as error:
        errors.print(f"[red]config:[/] {error}")
        return 2


async def _up(args: argparse.Namespace) -> int:
    from agent_service.server import AgentServer
    from agent_service.settings import AgentServiceSettings
    from state_service.server import StateServer
    from state_service.settings import StateServiceSettings

    state_overrides: dict[str, Any] = {"data_dir": Path(args.data_dir) / "state"}
    if args.state_listen:
        state_overrides["listen"] = args.state_listen
    state = await StateServer.start(StateServiceSettings(**state_overrides))
    agent_overrides: dict[str, Any] = {"state_target": state.address}
    if args.agent_listen:
        agent_overrides["listen"] = args.agent_listen
    if args.agents_config:
        agent_overrides["agents_config"] = Path(args.agents_config)
    try:
        agent = await AgentServer.start(AgentServiceSettings(**agent_overrides))
    except BaseException:
        await state.stop(grace=0)
        raise
    redis = f"embedded redis-server in {state.embedded.data_dir}" if state.embedded else "Redis"
    console.print("[bold green]statecar is up[/]  (Ctrl-C stops it)")
    console.print(f"  agent service  {agent.address}")
    console.print(f"  state service  {state.address}  on {redis}")
    if agent.metrics_port or state.metrics_port:
        console.print(
            f"  metrics        http://127.0.0.1:{agent.metrics_port}/metrics (agent), "
            f"http://127.0.0.1:{state.metrics_port}/metrics (state)"
        )
    console.print('  try            statecar chat --session demo "Hello!"', markup=False)
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    console.print("stopping: draining the agent service, then the state service")
    await agent.stop()
    await state.stop()
    console.print("stopped")
    return 0


def _message(argument: str | None) -> str:
    if argument not in (None, "-"):
        return str(argument)
    if sys.stdin.isatty():
        raise SystemExit('statecar chat: give the message as an argument, or "-" to read stdin')
    return sys.stdin.read().strip()


async def chat(args: argparse.Namespace) -> int:
    message = _message(args.message)
    async with AgentClient(
        args.agent_target, timeout=args.timeout, bearer_token=args.token
    ) as agents:
        await _require(agents, "agent service", args.agent_target, "--agent-target")
        final: ChatResult | None = None
        async for event in agents.stream_chat(
            args.session or "",
            message,
            agent=args.agent or "",
            request_id=args.request_id,
            workflow_id=args.workflow or "",
        ):
            if isinstance(event, TextDelta):
                console.print(event.text, end="", markup=False)
            elif isinstance(event, ToolCallStarted):
                console.print(Text(f"⚙ {event.name}({event.arguments})", style="dim"))
            elif isinstance(event, ToolCallFinished):
                console.print(Text(f"  → {event.output}", style="dim"))
            elif isinstance(event, HandoffEvent):
                console.print(Text(f"↪ {event.from_agent} hands off to {event.to_agent}", "dim"))
            else:
                final = event
    if final is not None:
        console.print()
        _print_pending(final)
        replayed = " · replayed (stored earlier)" if final.replayed else ""
        console.print(
            Text(
                f"[{final.agent} · session {final.session_id} · context {final.context_items} "
                f"items / {final.context_tokens} tokens · model {final.input_tokens} in / "
                f"{final.output_tokens} out{replayed}]",
                style="dim",
            )
        )
    return 0


def _print_pending(result: ChatResult) -> None:
    if not result.pending_approvals:
        return
    console.print(
        Text(
            f"⏸ paused: {_count(len(result.pending_approvals), 'tool call')} waiting for "
            f"approval (`statecar approve {result.session_id} [--reject] --all | ID ...`)",
            style="yellow",
        )
    )
    for approval in result.pending_approvals:
        arguments = json.dumps(approval.arguments, ensure_ascii=False)
        console.print(Text(f"  {approval.approval_id}  {approval.tool_name}({arguments})"))


async def approve(args: argparse.Namespace) -> int:
    """Lists a session's pending approvals, or approves (--reject: rejects)
    the named ones / all of them and prints the resumed turn."""
    async with AgentClient(
        args.agent_target, timeout=args.timeout, bearer_token=args.token
    ) as agents:
        await _require(agents, "agent service", args.agent_target, "--agent-target")
        if not args.approval_ids and not args.all:
            pending = await agents.list_approvals(args.session)
            if not pending:
                console.print(Text(f"no approvals pending in session {args.session}", "dim"))
            for approval in pending:
                arguments = json.dumps(approval.arguments, ensure_ascii=False)
                console.print(
                    Text(f"{approval.approval_id}  {approval.tool_name}({arguments})  ")
                    + Text(
                        f"[{approval.agent} · expires {approval.expire_time:%Y-%m-%d %H:%M}Z]",
                        "dim",
                    )
                )
            return 0
        decision = "reject" if args.reject else "approve"
        named = list(args.approval_ids)
        turn, decided = await agents.resolve_approvals(
            args.session,
            approve=[] if args.reject else named,
            reject=named if args.reject else [],
            remaining=decision if args.all else None,
            rejection_message=args.message or "",
            request_id=args.request_id,
        )
    for approval_id, verdict in decided.items():
        console.print(Text(f"{verdict}d {approval_id}", style="dim"))
    for item in turn.items[1:]:
        if item.type == "function_call_output":
            console.print(Text(f"  → {item.data.get('output', '')}", style="dim"))
    console.print(turn.reply, markup=False)
    _print_pending(turn)
    replayed = " · replayed (resumed earlier)" if turn.replayed else ""
    console.print(Text(f"[{turn.agent} · session {turn.session_id}{replayed}]", style="dim"))
    return 0


async def fork(args: argparse.Namespace) -> int:
    """Rewinds S into T (the items before seq N), then, with a message, runs
    that turn in T: "resend from an earlier turn" in one command."""
    async with AgentClient(
        args.agent_target, timeout=args.timeout, bearer_token=args.token
    ) as agents:
        await _require(agents, "agent service", args.agent_target, "--agent-target")
        forked = await agents.fork_session(
            args.session, args.new_session, before_seq=args.before_seq, request_id=args.request_id
        )
    replayed = " (replayed: made earlier by this request id)" if forked.replayed else ""
    console.print(
        Text(
            f"forked {args.session} into {forked.session_id}: "
            f"{_count(forked.copied_items, 'item')} up to seq {forked.last_seq}{replayed}",
            style="dim",
        )
    )
    if args.message is None:
        return 0
    args.session, args.workflow = forked.session_id, None
    args.request_id = f"{args.request_id}:turn" if args.request_id else None
    return await chat(args)


async def history(args: argparse.Namespace) -> int:
    async with StateClient(args.state_target, bearer_token=args.token) as state:
        await _require(state, "state service", args.state_target, "--state-target")
        items = await state.all_items(args.session)
    if args.json:
        # JSON Lines: one compact object per item, for jq and other programs.
        for item in items:
            sys.stdout.write(json.dumps({"seq": item.seq, "item": item.data}) + "\n")
        return 0
    table = Table(title=f"session {args.session}: {_count(len(items), 'item')}", show_lines=False)
    table.add_column("seq", justify="right")
    table.add_column("who")
    table.add_column("agent")
    table.add_column("content", overflow="fold")
    for item in items:
        who = item.data.get("role") or item.data.get("type", "")
        table.add_row(
            str(item.seq),
            str(who),
            item.metadata.get("statecar.agent", ""),
            item_text(item.data) or json.dumps(item.data)[:200],
        )
    console.print(table)
    return 0


async def sessions(args: argparse.Namespace) -> int:
    async with StateClient(args.state_target, bearer_token=args.token) as state:
        await _require(state, "state service", args.state_target, "--state-target")
        page = await state.list_sessions(page_size=args.limit)
    table = Table(title=_count(len(page.sessions), "session"))
    for column in ("session", "items", "updated (UTC)", "expires (UTC)"):
        table.add_column(column)
    for info in page.sessions:
        expires = info.expire_time.isoformat(timespec="seconds") if info.expire_time else "never"
        table.add_row(
            info.session_id,
            str(info.item_count),
            info.update_time.isoformat(timespec="seconds"),
            expires,
        )
    console.print(table)
    if page.next_page_token:
        console.print(Text(f"(more than {args.limit}; use --limit)", style="dim"))
    return 0


async def agents_command(args: argparse.Namespace) -> int:
    async with AgentClient(args.agent_target, bearer_token=args.token) as client:
        await _require(client, "agent service", args.agent_target, "--agent-target")
        listed, default = await client.list_agents()
    table = Table(title="agents")
    for column in ("name", "model", "budget", "tools", "handoffs", "description"):
        table.add_column(column)
    for agent in listed:
        name = f"{agent.name} (default)" if agent.name == default else agent.name
        table.add_row(
            name,
            agent.model,
            str(agent.token_budget),
            ", ".join(agent.tools),
            ", ".join(agent.handoffs),
            agent.description,
        )
    console.print(table)
    return 0


async def export_command(args: argparse.Namespace) -> int:
    from state_service.client.portability import export_sessions

    # A command line's own file: blocking I/O is all this loop does.
    output = sys.stdout if args.output in (None, "-") else open(args.output, "w")  # noqa: ASYNC230
    try:
        async with StateClient(args.state_target, bearer_token=args.token) as state:
            await _require(state, "state service", args.state_target, "--state-target")
            stats = await export_sessions(
                state, output.write, session_ids=args.session or None, page_size=args.page_size
            )
    finally:
        if output is not sys.stdout:
            output.close()
    errors.print(f"exported {_count(stats.sessions, 'session')}, {_count(stats.items, 'item')}")
    return 0


async def _file_lines(path: str) -> AsyncIterator[str]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: ASYNC230
    try:
        for line in stream:
            yield line
    finally:
        if stream is not sys.stdin:
            stream.close()


async def import_command(args: argparse.Namespace) -> int:
    from state_service.client import importers
    from state_service.client.portability import (
        FormatError,
        ImportConflict,
        Record,
        import_records,
        parse_lines,
    )

    ids = args.session or None
    records: AsyncIterator[Record]
    if args.source_kind == "jsonl":
        records = parse_lines(_file_lines(args.file or "-"))
    elif not args.source:
        errors.print(f"--from {args.source_kind} needs --source (a path or a URL)")
        return 2
    elif args.source_kind == "sqlite":
        records = importers.sqlite_records(Path(args.source), session_ids=ids)
    elif args.source_kind == "sqlalchemy":
        records = importers.sqlalchemy_records(args.source, session_ids=ids)
    elif args.source_kind == "redis-session":
        prefix = args.key_prefix or "agents:session"
        records = importers.redis_session_records(args.source, session_ids=ids, key_prefix=prefix)
    else:
        prefix = args.key_prefix or "session"
        records = importers.redis_json_records(args.source, session_ids=ids, key_prefix=prefix)
    async with StateClient(args.state_target, bearer_token=args.token) as state:
        await _require(state, "state service", args.state_target, "--state-target")
        try:
            stats = await import_records(state, records)
        except (FormatError, ImportConflict) as error:
            errors.print(f"[red]import stopped:[/] {error}", markup=True)
            return 1
    errors.print(
        f"{_count(stats.sessions, 'session')}: {stats.imported} items imported, "
        f"{stats.skipped} already there"
    )
    return 0


async def erase_command(args: argparse.Namespace) -> int:
    if bool(args.session) == bool(args.tenant):
        errors.print("name exactly one of --session or --tenant")
        return 2
    if args.tenant and not args.yes:
        errors.print(f"this erases everything of tenant {args.tenant!r}; add --yes to confirm")
        return 2
    async with StateClient(args.state_target, bearer_token=args.token) as state:
        await _require(state, "state service", args.state_target, "--state-target")
        if args.session:
            result = await state.erase_session(args.session)
        else:
            result = await state.erase_tenant(args.tenant)
    errors.print(
        f"erased {_count(result.sessions, 'session')} "
        f"({_count(result.deleted_keys, 'Redis key')}, "
        f"{_count(result.durable_rows, 'durable row')})"
    )
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="statecar", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    agent_target = os.environ.get("STATECAR_AGENT_TARGET", DEFAULT_AGENT_TARGET)
    state_target = os.environ.get("STATECAR_STATE_TARGET", DEFAULT_STATE_TARGET)
    # Not a flag's default shown in --help: the token stays out of the terminal.
    main.set_defaults(token=os.environ.get("STATECAR_TOKEN") or None)

    run = commands.add_parser("up", help="run Redis, the state and the agent service")
    run.add_argument("--data-dir", default=".statecar", help="embedded Redis data (AOF)")
    run.add_argument("--state-listen", help="state service address (default 127.0.0.1:50051)")
    run.add_argument("--agent-listen", help="agent service address (default 127.0.0.1:50061)")
    run.add_argument("--agents-config", help="YAML or TOML agents file")
    run.set_defaults(handler=up)

    talk = commands.add_parser("chat", help="one turn; streams the reply")
    talk.add_argument("message", nargs="?", help='the message; "-" or none: read stdin')
    talk.add_argument("--session", help="session id (omit with --workflow)")
    talk.add_argument("--agent", help="agent name (default: the configured default)")
    talk.add_argument("--workflow", help="run the turn in this multi-agent workflow")
    talk.add_argument("--request-id", help="retry-safe id of this turn")
    talk.add_argument("--timeout", type=float, default=120.0)
    talk.add_argument("--agent-target", default=agent_target)
    talk.set_defaults(handler=chat)

    branch = commands.add_parser(
        "fork", help="rewind a session into a new one (then chat there to resend)"
    )
    branch.add_argument("message", nargs="?", help="optional: a turn to run in the new session")
    branch.add_argument("--session", required=True, help="the session to rewind")
    branch.add_argument(
        "--before-seq",
        type=int,
        default=0,
        help="keep the items before this seq (`statecar history` shows them; 0: all)",
    )
    branch.add_argument("--new-session", required=True, help="the session to create")
    branch.add_argument("--agent", help="agent of the turn (default: the configured default)")
    branch.add_argument("--request-id", help="retry-safe id of the fork (and its turn)")
    branch.add_argument("--timeout", type=float, default=120.0)
    branch.add_argument("--agent-target", default=agent_target)
    branch.set_defaults(handler=fork)

    decide = commands.add_parser(
        "approve", help="approve or reject a paused turn's tool calls (no ids: list them)"
    )
    decide.add_argument("session", help="the session of the paused turn")
    decide.add_argument("approval_ids", nargs="*", help="approval ids (`statecar approve S`)")
    decide.add_argument("--all", action="store_true", help="decide every pending approval")
    decide.add_argument("--reject", action="store_true", help="reject instead of approve")
    decide.add_argument("--message", help="with --reject: what the model is told")
    decide.add_argument("--request-id", help="retry-safe id of this decision")
    decide.add_argument("--timeout", type=float, default=120.0)
    decide.add_argument("--agent-target", default=agent_target)
    decide.set_defaults(handler=approve)

    show = commands.add_parser("history", help="a session's whole log")
    show.add_argument("--session", required=True)
    show.add_argument("--json", action="store_true", help="JSON Lines: one object per item")
    show.add_argument("--state-target", default=state_target)
    show.set_defaults(handler=history)

    listing = commands.add_parser("sessions", help="sessions, in id order")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--state-target", default=state_target)
    listing.set_defaults(handler=sessions)

    out = commands.add_parser("export", help="sessions as JSON Lines (all, or --session)")
    out.add_argument("--session", action="append", help="a session to export (repeatable)")
    out.add_argument("--output", help="file to write (default: stdout)")
    out.add_argument("--page-size", type=int, default=200, help="items per ListItems page")
    out.add_argument("--state-target", default=state_target)
    out.set_defaults(handler=export_command)

    bring = commands.add_parser(
        "import", help="sessions from a `statecar export` or another store (idempotent)"
    )
    bring.add_argument("file", nargs="?", help="JSON Lines from `statecar export` (- : stdin)")
    bring.add_argument(
        "--from",
        dest="source_kind",
        default="jsonl",
        choices=("jsonl", "sqlite", "sqlalchemy", "redis-session", "redis-json"),
        help="the source's kind (openai-agents SQLiteSession / SQLAlchemySession / "
        "RedisSession, or one JSON document per session:<id> key)",
    )
    bring.add_argument("--source", help="the source: a SQLite file, a database or Redis URL")
    bring.add_argument("--session", action="append", help="import only this session (repeatable)")
    bring.add_argument("--key-prefix", help="Redis key prefix of the source")
    bring.add_argument("--state-target", default=state_target)
    bring.set_defaults(handler=import_command)

    wipe = commands.add_parser("erase", help="erase a session or a whole tenant, everywhere")
    wipe.add_argument("--session", help="the session to erase")
    wipe.add_argument("--tenant", help="your tenant id: erase all of it (with --yes)")
    wipe.add_argument("--yes", action="store_true", help="confirm a tenant erase")
    wipe.add_argument("--state-target", default=state_target)
    wipe.set_defaults(handler=erase_command)

    agents = commands.add_parser("agents", help="the configured agents")
    agents.add_argument("--agent-target", default=agent_target)
    agents.set_defaults(handler=agents_command)
    return main


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(args.handler(args))
    except AgentServiceError as error:
        errors.print(f"[red]agent service:[/] {error.code.name}: {error.message}", markup=True)
        code = 1
    except StateServiceError as error:
        errors.print(f"[red]state service:[/] {error.code.name}: {error.message}", markup=True)
        code = 1
    except Unreachable as error:
        errors.print(f"[red]unreachable:[/] {error}", markup=True)
        code = 1
    except StartupError as error:
        errors.print(f"[red]cannot start:[/] {error}")
        code = 78  # EX_CONFIG, as the services exit
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
