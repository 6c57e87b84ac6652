"""`state-service` / `python -m state_service`: flags mirror STATE_SERVICE_* env."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic_settings import CliApp

from shared_runtime.process import StartupError
from state_service.server import serve
from state_service.settings import StateServiceSettings


def main(argv: list[str] | None = None) -> None:
    settings = CliApp.run(StateServiceSettings, cli_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        logging.getLogger("statecar.state").error("cannot start: %s", error)
        sys.exit(78)  # EX_CONFIG


if __name__ == "__main__":
    main()
