"""Export and import rate, and the peak Python heap of each at two export
sizes (10x apart): the heap must not follow the size (docs/data-portability.md).
Not part of `make bench`: `.venv/bin/python -m bench.portability`."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

from bench.common import redis_process, state_service, table
from state_service.client import NewItem, StateClient
from state_service.client.portability import export_sessions, import_records, parse_lines

SIZES = (2_000, 20_000)
PAGE_SIZE = 200


def message(n: int) -> dict[str, Any]:
    role = "user" if n % 2 == 0 else "assistant"
    return {"role": role, "content": f"message {n}: " + "some words of a conversation " * 6}


async def measure(client: StateClient, n: int) -> list[str]:
    session_id = f"s{n}"
    for start in range(0, n, 1000):
        await client.append_items(
            session_id, [NewItem(message(i)) for i in range(start, start + 1000)]
        )
    written = 0

    def discard(line: str) -> None:
        nonlocal written
        written += len(line)

    tracemalloc.start()
    started = time.perf_counter()
    exported = await export_sessions(client, discard, session_ids=[session_id], page_size=PAGE_SIZE)
    export_seconds = time.perf_counter() - started
    export_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    lines: list[str] = []
    await export_sessions(client, lines.append, session_ids=[session_id], page_size=PAGE_SIZE)
    await client.erase_session(session_id)

    async def source() -> AsyncIterator[str]:
        for line in lines:
            yield line

    tracemalloc.start()  # after `lines` exist: only what the import allocates
    started = time.perf_counter()
    imported = await import_records(client, parse_lines(source()), page_size=PAGE_SIZE)
    import_seconds = time.perf_counter() - started
    import_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return [
        f"{n:,}",
        f"{written / 1e6:.1f}",
        f"{exported.items / export_seconds:,.0f}",
        f"{export_peak / 1e6:.2f}",
        f"{imported.imported / import_seconds:,.0f}",
        f"{import_peak / 1e6:.2f}",
    ]


async def main() -> None:
    with redis_process() as redis, state_service(redis.url) as (address, _):
        async with StateClient(address, timeout=60) as client:
            rows = [await measure(client, n) for n in SIZES]
    print(
        table(
            [
                "items",
                "export MB",
                "export items/s",
                "export peak heap MB",
                "import items/s",
                "import peak heap MB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
