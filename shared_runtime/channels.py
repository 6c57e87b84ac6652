"""What both services' clients do with their gRPC channels beyond calls."""

from __future__ import annotations

import asyncio

import grpc


async def reachable(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Whether the channel connects within `timeout` seconds: lets a caller
    say "nothing is listening there" at once instead of waiting out a call's
    deadline."""
    try:
        async with asyncio.timeout(timeout):
            await channel.channel_ready()
    except TimeoutError:
        return False
    return True
