"""End to end with a real Prometheus server: it scrapes real state and agent
service processes, evaluates the shipped rules, and its HTTP API reports the
cache hit ratio, the turns and the gRPC codes these tests caused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_service.client import AgentClient, AgentServiceError
from state_service.client import StateClient
from state_service.storage.embedded import EmbeddedRedis, free_port
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc
from tests.conftest import PrometheusFactory
from tests.helpers import NOT_SERVING, wait_health
from tests.processes import agent_service_process, state_service_process, wait_serving
from tests.prometheus import RULE_FILES, ScrapeTarget, require_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JOB = "statecar-state"
SESSIONS = 6
# Closer than one lookup in 27 would move the ratio: the difference between
# Prometheus and the test is scrape resolution, not a miscount.
TOLERANCE = 0.005
# The cache hit ratio as the README gives it (hits and partial hits / all).
HIT_RATIO = (
    f'sum(rate(statecar_state_cache_lookups_total{{job="{JOB}",result=~"hit|partial"}}[5m]))'
    f' / sum(rate(statecar_state_cache_lookups_total{{job="{JOB}"}}[5m]))'
)


def close_to(expected: float) -> Any:
    return lambda value: value is not None and abs(value - expected) <= TOLERANCE


async def test_prometheus_reports_the_hit_ratio_and_codes_we_caused(
    tmp_path: Path, redis_server: EmbeddedRedis, prometheus_factory: PrometheusFactory
) -> None:
    require_binary("prometheus")
    metrics_port = free_port()
    with state_service_process(
        redis_server.url, {"STATE_SERVICE_METRICS_PORT": str(metrics_port)}
    ) as (address, _):
        await wait_serving(address)
        prometheus = await prometheus_factory(
            [ScrapeTarget(JOB, f"127.0.0.1:{metrics_port}")], rule_files=RULE_FILES
        )
        await prometheus.wait_for_targets([JOB])
        # The series exist at zero from the start, and Prometheus has them
        # before any traffic: rate() then counts every lookup.
        await prometheus.wait_for(
            f'count(statecar_state_cache_lookups_total{{job="{JOB}"}})', lambda v: v == 3
        )

        user = [{"role": "user", "content": "hello"}]
        async with StateClient(address, timeout=5.0) as client:
            for n in range(SESSIONS):
                await client.append_items(f"s{n}", user * 2)
            for n in range(SESSIONS):
                await client.get_context(f"s{n}")  # miss: 6
            for _ in range(3):
                for n in range(SESSIONS):
                    await client.get_context(f"s{n}")  # hit: 18
            for n in range(3):
                await client.append_items(f"s{n}", user)
                await client.get_context(f"s{n}")  # partial: 3
        # GetSession through a plain channel (no retries): 7 OK, 4 NotFound,
        # 2 InvalidArgument.
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = pb_grpc.StateServiceStub(channel)  # the stubs lack aio types
            for session_id, times in (("s0", 7), ("nobody", 4), ("bad id!", 2)):
                for _ in range(times):
                    try:
                        await stub.GetSession(pb.GetSessionRequest(session_id=session_id))
                    except grpc.aio.AioRpcError:
                        pass

        await prometheus.wait_for_scrape_after(JOB)
        lookups = await prometheus.values_by(
            f'sum by (result) (statecar_state_cache_lookups_total{{job="{JOB}"}})', "result"
        )
        assert lookups == {"hit": 18, "partial": 3, "miss": 6}
        expected_ratio = (18 + 3) / 27
        ratio = await prometheus.value(HIT_RATIO)
        assert ratio is not None and abs(ratio - expected_ratio) <= TOLERANCE, ratio
        # The shipped recording rule agrees (once evaluated after that scrape).
        await prometheus.wait_for(
            f'job:statecar_state_cache_hit_ratio:rate5m{{job="{JOB}"}}', close_to(expected_ratio)
        )

        handled = f'grpc_server_handled_total{{job="{JOB}",grpc_method="GetSession"}}'
        by_code = await prometheus.values_by(f"sum by (grpc_code) ({handled})", "grpc_code")
        assert {code: n for code, n in by_code.items() if n} == {
            "OK": 7,
            "NotFound": 4,
            "InvalidArgument": 2,
        }
        shares = await prometheus.values_by(
            f"sum by (grpc_code) (rate({handled}[5m])) / scalar(sum(rate({handled}[5m])))",
            "grpc_code",
        )
        for code, count in (("OK", 7), ("NotFound", 4), ("InvalidArgument", 2)):
            assert abs(shares[code] - count / 13) <= TOLERANCE, (code, shares)
        # Callers' mistakes are not server faults.
        await prometheus.wait_for(f'job:grpc_server_error_ratio:rate5m{{job="{JOB}"}}', close_to(0))

        # Redis goes away: 3 calls fail with Unavailable (a server fault), the
        # gauges drop and the alert is pending.
        redis_server.stop()
        await wait_health(address, NOT_SERVING)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.StateServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.GetSession(pb.GetSessionRequest(session_id="s0"))
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        await prometheus.wait_for(f'statecar_state_redis_up{{job="{JOB}"}}', lambda v: v == 0)
        await prometheus.wait_for(f'statecar_state_serving{{job="{JOB}"}}', lambda v: v == 0)
        api_calls = SESSIONS + 3 + 27 + 13 + 3  # appends, contexts, GetSession, failures
        await prometheus.wait_for(
            f'job:grpc_server_error_ratio:rate5m{{job="{JOB}"}}', close_to(3 / api_calls)
        )
        await prometheus.wait_for(
            'count(ALERTS{alertname="StatecarStateRedisUnreachable",alertstate="pending"})',
            lambda v: v == 1,
        )


AGENT_JOB = "statecar-agent"


async def test_prometheus_reports_agent_turns_and_its_state_calls(
    redis_server: EmbeddedRedis, prometheus_factory: PrometheusFactory
) -> None:
    require_binary("prometheus")
    state_metrics, agent_metrics = free_port(), free_port()
    with (
        state_service_process(
            redis_server.url, {"STATE_SERVICE_METRICS_PORT": str(state_metrics)}
        ) as (state, _),
        agent_service_process(state, {"AGENT_SERVICE_METRICS_PORT": str(agent_metrics)}) as (
            agent,
            _,
        ),
    ):
        await wait_serving(state)
        await wait_serving(agent)
        prometheus = await prometheus_factory(
            [
                ScrapeTarget(JOB, f"127.0.0.1:{state_metrics}"),
                ScrapeTarget(AGENT_JOB, f"127.0.0.1:{agent_metrics}"),
            ],
            rule_files=RULE_FILES,
        )
        await prometheus.wait_for_targets([JOB, AGENT_JOB])
        async with AgentClient(agent, timeout=10) as agents:
            await agents.chat("p1", "Hello")
            await agents.chat("p1", "What is 6 * 7?")  # a tool round trip
            await agents.chat("p2", "Hello", request_id="same")
            await agents.chat("p2", "Hello", request_id="same")  # replayed
            for _ in range(2):
                with pytest.raises(AgentServiceError):
                    await agents.chat("bad id!", "Hello")

        await prometheus.wait_for_scrape_after(AGENT_JOB)
        turns = await prometheus.values_by(
            f'sum by (outcome) (statecar_agent_turns_total{{job="{AGENT_JOB}"}})', "outcome"
        )
        assert {outcome: n for outcome, n in turns.items() if n} == {"ok": 3, "replayed": 1}
        chats = await prometheus.values_by(
            f'sum by (grpc_code) (grpc_server_handled_total{{job="{AGENT_JOB}",'
            f'grpc_method="Chat"}})',
            "grpc_code",
        )
        assert {code: n for code, n in chats.items() if n} == {"OK": 4, "InvalidArgument": 2}
        appends = await prometheus.value(
            f'sum(grpc_client_handled_total{{job="{AGENT_JOB}",grpc_method="AppendItems",'
            f'grpc_code="OK"}})'
        )
        assert appends == 3
        tools = await prometheus.value(
            f'sum(statecar_agent_tool_calls_total{{job="{AGENT_JOB}",tool="calculate"}})'
        )
        assert tools == 1
        # The state service saw the same appends from the server side.
        await prometheus.wait_for_scrape_after(JOB)
        served = await prometheus.value(
            f'sum(grpc_server_handled_total{{job="{JOB}",grpc_method="AppendItems",'
            f'grpc_code="OK"}})'
        )
        assert served == 3
        await prometheus.wait_for(
            f'job:statecar_agent_turn_error_ratio:rate5m{{job="{AGENT_JOB}"}}', close_to(0)
        )
