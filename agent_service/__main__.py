"""`agent-service` / `python -m agent_service`: flags mirror AGENT_SERVICE_* env."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic_settings import CliApp

from agent_service.config import ConfigError
from agent_service.server import serve
from agent_service.settings import AgentServiceSettings
from shared_runtime.process import StartupError


def main(argv: list[str] | None = None) -> None:
    settings = CliApp.run(AgentServiceSettings, cli_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except ConfigError as error:
        raise SystemExit(f"agent-service: {error}") from None
    except StartupError as error:
        logging.getLogger("statecar.agent").error("cannot start: %s", error)
        sys.exit(78)  # EX_CONFIG


if __name__ == "__main__":
    main()
