"""The gRPC-Python floor: a grpc.aio server answering GetContext with a fixed,
pre-serialized payload (the same bytes the state service returns), and
AppendItems with a fixed small response (what the state service answers)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc

from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

_APPENDED = pb.AppendItemsResponse(etag="0123456789abcdef.42", first_seq=42, last_seq=42)


class Echo(pb_grpc.StateServiceServicer):  # only GetContext and AppendItems are called
    def __init__(self, response: pb.GetContextResponse) -> None:
        self._response = response

    async def GetContext(self, request: pb.GetContextRequest, context: Any) -> Any:
        return self._response

    async def AppendItems(self, request: pb.AppendItemsRequest, context: Any) -> Any:
        return _APPENDED


async def main() -> None:
    address, payload = sys.argv[1], Path(sys.argv[2]).read_bytes()
    server = grpc.aio.server()
    pb_grpc.add_StateServiceServicer_to_server(
        Echo(pb.GetContextResponse.FromString(payload)),  # type: ignore[abstract]
        server,
    )
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
