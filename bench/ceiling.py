"""6. Throughput ceiling of one state-service process on this machine, and what
a second process sharing the port through SO_REUSEPORT buys."""

from __future__ import annotations

from bench.common import redis_process, state_service, table, throughput
from bench.report import Report
from state_service.client import StateClient
from state_service.storage.embedded import free_port


async def _rates(address: str, concurrency: int) -> tuple[float, float]:
    async with StateClient(address) as client:
        await client.append_items("hot", [{"role": "user", "content": "x" * 200}] * 20)

        async def read() -> object:
            return await client.get_context("hot")

        counter = iter(range(10**9))

        async def write() -> object:
            return await client.append_items(
                f"w{next(counter) % 256}", [{"role": "user", "content": "y" * 200}]
            )

        return (
            await throughput(read, concurrency=concurrency, seconds=4),
            await throughput(write, concurrency=concurrency, seconds=4),
        )


async def run(report: Report) -> None:
    rows = []
    with redis_process() as redis_server:
        with state_service(redis_server.url) as (address, _):
            reads, writes = await _rates_many(address, channels=4)
        rows.append(["1 process", f"{reads:.0f}", f"{writes:.0f}"])
        port = free_port()
        # grpc sets SO_REUSEPORT by default: two processes share one port and
        # the kernel spreads connections between them.
        with (
            state_service(redis_server.url, port=port) as (address, _),
            state_service(redis_server.url, port=port),
        ):
            reads2, writes2 = await _rates_many(address, channels=4)
        rows.append(["2 processes, SO_REUSEPORT", f"{reads2:.0f}", f"{writes2:.0f}"])
    text = (
        "Closed loop, 64 concurrent callers over 4 connections, 4 s each (req/s; GetContext of a 20-item cached "
        "session, AppendItems of one item):\n\n"
        + table(["server", "GetContext/s", "AppendItems/s"], rows)
    )
    text += (
        f"\n\nA second process on the same port gives {reads2 / reads:.2f}× reads and "
        f"{writes2 / writes:.2f}× writes here. The load generator is Python on the same two "
        "cores, so these are lower bounds for the server. uvloop was not measured: grpc.aio "
        "runs its own poller and the profile shows the loop mostly waiting on I/O."
    )
    report.add("6. Throughput ceiling", text)


async def _rates_many(address: str, channels: int) -> tuple[float, float]:
    """64 callers over `channels` connections (SO_REUSEPORT balances connections)."""
    import asyncio

    results = await asyncio.gather(*(_rates(address, 64 // channels) for _ in range(channels)))
    return sum(r for r, _ in results), sum(w for _, w in results)
