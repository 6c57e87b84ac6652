"""A state service process that profiles itself with pyinstrument on demand:
SIGUSR1 starts the profiler, SIGUSR2 stops it and writes the reports (a call
tree and a flat list of frames by self time) next to the path given, SIGTERM
stops the server. Settings come from STATE_SERVICE_* as for the real process.

Used by bench/profile.py; the window between the two signals holds only the
load it wants profiled (no start-up, no seeding).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from pyinstrument import Profiler
from pyinstrument.renderers import ConsoleRenderer

from state_service.server import StateServer
from state_service.settings import StateServiceSettings


def _write(profiler: Profiler, out: Path) -> None:
    session = profiler.last_session
    assert session is not None
    tree = ConsoleRenderer(unicode=True, show_all=False, short_mode=False)
    out.with_suffix(".tree.txt").write_text(tree.render(session))
    flat = ConsoleRenderer(unicode=True, show_all=True, flat=True, flat_time="self")
    out.with_suffix(".flat.txt").write_text(flat.render(session))
    out.with_suffix(".done").write_text("")


async def main() -> None:
    out = Path(sys.argv[1])
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0002
    app = await StateServer.start(StateServiceSettings.model_validate({}))
    loop = asyncio.get_running_loop()
    profiler = Profiler(interval=interval, async_mode="disabled")
    stopping: list[asyncio.Task[None]] = []
    loop.add_signal_handler(signal.SIGUSR1, profiler.start)

    def stop_profiler() -> None:
        profiler.stop()
        _write(profiler, out)

    loop.add_signal_handler(signal.SIGUSR2, stop_profiler)
    loop.add_signal_handler(
        signal.SIGTERM, lambda: stopping.append(asyncio.create_task(app.stop(0)))
    )
    print(f"ready {app.address}", flush=True)
    await app.wait_for_termination()
    if stopping:
        await asyncio.gather(*stopping)


if __name__ == "__main__":
    asyncio.run(main())
