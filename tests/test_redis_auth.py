"""Redis AUTH with an ACL user: works, a wrong password refuses to start with a
clear message (or answers UNAVAILABLE once running), and the password never
appears in logs. Real redis-server with `user` directives."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared_runtime.process import StartupError
from state_service.client import StateClient, StateUnavailableError
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis, free_port
from tests.conftest import state_settings
from tests.helpers import NOT_SERVING, health_status
from tests.patience import patience
from tests.processes import wait_serving
from tests.redis_cluster import EmbeddedRedisCluster

PASSWORD = "pw-Zq8-never-in-logs"
ADMIN_PASSWORD = "admin-pw-Zq8"
# What statecar needs: its keys, read/write/scripting commands, WAIT for
# replication, PING for readiness (+@connection also covers HELLO, CLIENT SETINFO).
STATECAR_ACL = f"statecar on >{PASSWORD} ~statecar:* +@read +@write +@scripting +@connection +wait"


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        tmp_path / "redis",
        port=free_port(),
        extra_args=(
            "--user",
            "default",
            "off",
            "--user",
            *STATECAR_ACL.split(" "),
            "--user",
            "admin",
            "on",
            f">{ADMIN_PASSWORD}",
            "~*",
            "+@all",
        ),
    )
    server.start()
    try:
        yield server
    finally:
        server.close()


def admin(server: EmbeddedRedis) -> Any:
    """An admin connection (typed Any: redis-py's execute_command is untyped)."""
    return aioredis.from_url(server.url, username="admin", password=ADMIN_PASSWORD)


async def test_acl_user_serves_every_kind_of_call(acl_redis: EmbeddedRedis) -> None:
    server = await StateServer.start(
        state_settings(acl_redis.url, redis_username="statecar", redis_password=PASSWORD)
    )
    try:
        async with StateClient(server.address, timeout=5.0) as client:
            written = await client.append_items("s", [{"role": "user", "content": "hi"}])
            assert (await client.get_context("s")).etag == written.etag
            assert [s.session_id for s in (await client.list_sessions()).sessions] == ["s"]
            await client.pop_item("s")
            await client.update_workflow(
                "wf", current_stage="a", results={}, agent_sessions={}, etag="0"
            )
            await client.delete_session("s")
    finally:
        await server.stop(grace=0.5)


async def test_wrong_password_refuses_to_start_with_a_clear_message(
    acl_redis: EmbeddedRedis,
) -> None:
    wrong = "wrong-" + PASSWORD
    with pytest.raises(StartupError) as raised:
        await StateServer.start(
            state_settings(acl_redis.url, redis_username="statecar", redis_password=wrong)
        )
    message = str(raised.value)
    assert "rejected" in message and "credentials" in message and "statecar" in message
    assert wrong not in message and PASSWORD not in message


async def test_password_change_at_runtime_is_unavailable_not_internal(
    acl_redis: EmbeddedRedis,
) -> None:
    """Credentials revoked while running: calls answer UNAVAILABLE with reason
    BACKEND_AUTH and readiness goes NOT_SERVING; restoring them recovers."""
    server = await StateServer.start(
        state_settings(acl_redis.url, redis_username="statecar", redis_password=PASSWORD)
    )
    r = admin(acl_redis)
    try:
        async with StateClient(server.address, timeout=3.0) as client:
            await client.append_items("s", [{"role": "user", "content": "before"}])
            await r.execute_command("ACL", "SETUSER", "statecar", "resetpass", ">rotated")
            await r.execute_command("CLIENT", "KILL", "USER", "statecar")
            with pytest.raises(StateUnavailableError) as raised:
                await client.get_context("s", timeout=2.0)
            assert raised.value.reason == "BACKEND_AUTH"
            deadline = time.monotonic() + patience(5)
            while await health_status(server.address) != NOT_SERVING:
                assert time.monotonic() < deadline, "readiness never went NOT_SERVING"
                await asyncio.sleep(0.05)
            await r.execute_command("ACL", "SETUSER", "statecar", "resetpass", f">{PASSWORD}")
            deadline = time.monotonic() + patience(5)
            while True:
                try:
                    context = await client.get_context("s", timeout=1.0)
                    break
                except StateUnavailableError:
                    assert time.monotonic() < deadline, "never recovered"
                    await asyncio.sleep(0.1)
            assert [i.data["content"] for i in context.items] == ["before"]
    finally:
        await r.aclose()
        await server.stop(grace=0.5)


async def test_missing_acl_permission_is_unavailable_with_its_reason(
    acl_redis: EmbeddedRedis,
) -> None:
    r = admin(acl_redis)
    await r.execute_command("ACL", "SETUSER", "statecar", "-@scripting")
    await r.aclose()
    server = await StateServer.start(
        state_settings(acl_redis.url, redis_username="statecar", redis_password=PASSWORD)
    )
    try:
        async with StateClient(server.address, timeout=3.0) as client:
            with pytest.raises(StateUnavailableError) as raised:
                await client.append_items("s", [{"role": "user", "content": "x"}])
            assert raised.value.reason == "BACKEND_PERMISSION"
    finally:
        await server.stop(grace=0.5)


@pytest.mark.slow
async def test_password_never_appears_in_logs(acl_redis: EmbeddedRedis, tmp_path: Path) -> None:
    """The real `state-service` process at DEBUG: a wrong password exits with a
    clear message (status 78); the right one serves, drains and exits 0; the
    password is in neither output, nor in the password-file variant's."""
    base_env = {
        **os.environ,
        "STATE_SERVICE_REDIS_URL": acl_redis.url,
        "STATE_SERVICE_REDIS_USERNAME": "statecar",
        "STATE_SERVICE_METRICS_PORT": "0",
        "STATE_SERVICE_LOG_LEVEL": "DEBUG",
        "STATE_SERVICE_DRAIN_SECONDS": "1",
    }
    wrong = subprocess.run(
        [sys.executable, "-m", "state_service"],
        env={
            **base_env,
            "STATE_SERVICE_LISTEN": f"127.0.0.1:{free_port()}",
            "STATE_SERVICE_REDIS_PASSWORD": "not-" + PASSWORD,
        },
        capture_output=True,
        timeout=60,
        check=False,
    )
    wrong_output = wrong.stdout.decode() + wrong.stderr.decode()
    assert wrong.returncode == 78, wrong_output
    assert "Redis rejected statecar's credentials" in wrong_output
    assert PASSWORD not in wrong_output

    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    for secret_env in (
        {"STATE_SERVICE_REDIS_PASSWORD": PASSWORD},
        {"STATE_SERVICE_REDIS_PASSWORD_FILE": str(password_file)},
    ):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "state_service"],
            env={**base_env, **secret_env, "STATE_SERVICE_LISTEN": f"127.0.0.1:{port}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            address = f"127.0.0.1:{port}"
            await wait_serving(address)
            async with StateClient(address, timeout=5.0) as client:
                await client.append_items("s", [{"role": "user", "content": "x"}])
                await client.list_sessions()
            process.send_signal(signal.SIGTERM)
            output, _ = await asyncio.to_thread(process.communicate, None, 30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = output.decode()
        assert process.returncode == 0, text
        assert "listening on" in text  # the log was really captured
        assert PASSWORD not in text


@pytest.mark.slow
async def test_cluster_with_requirepass(tmp_path: Path) -> None:
    """Credentials reach every node of a cluster; wrong ones stop startup."""
    with EmbeddedRedisCluster(tmp_path / "cluster", password=PASSWORD) as cluster:
        with pytest.raises(StartupError):
            await StateServer.start(
                state_settings(cluster.url, redis_cluster=True, redis_password="wrong")
            )
        server = await StateServer.start(
            state_settings(cluster.url, redis_cluster=True, redis_password=PASSWORD)
        )
        try:
            async with StateClient(server.address, timeout=5.0) as client:
                for n in range(6):  # sessions on several primaries
                    await client.append_items(f"s{n}", [{"role": "user", "content": "x"}])
                listed = (await client.list_sessions()).sessions
                assert [s.session_id for s in listed] == [f"s{n}" for n in range(6)]
        finally:
            await server.stop(grace=0.5)
