"""`state-service` / `python -m state_service`: flags mirror STATE_SERVICE_* env.

`state-service migrate` applies the durable tier's schema migrations to the
database of STATE_SERVICE_POSTGRES_URL (idempotent) and exits; the server
never migrates by itself.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic_settings import CliApp

from shared_runtime.process import StartupError
from state_service.settings import StateServiceSettings


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["migrate"]:
        sys.exit(migrate(args[1:]))
    from state_service.server import serve

    settings = CliApp.run(StateServiceSettings, cli_args=args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        logging.getLogger("statecar.state").error("cannot start: %s", error)
        sys.exit(78)  # EX_CONFIG


def migrate(args: list[str]) -> int:
    """Brings the durable tier's schema to this version; the exit status."""
    settings = CliApp.run(StateServiceSettings, cli_args=args)
    if settings.postgres_url is None:
        print("state-service migrate: STATE_SERVICE_POSTGRES_URL is not set", file=sys.stderr)
        return 78
    try:
        from state_service.storage.postgres import PostgresTier
    except ImportError as error:
        print(
            f"state-service migrate: the PostgreSQL driver is missing ({error}); install "
            "statecar with the `postgres` extra",
            file=sys.stderr,
        )
        return 78
    url = settings.postgres_url.get_secret_value()

    async def run() -> list[int]:
        tier = await PostgresTier.connect(url, timeout_seconds=settings.postgres_timeout_seconds)
        try:
            return await tier.migrate()
        finally:
            await tier.close()

    import asyncpg

    try:
        applied = asyncio.run(run())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        # The error names no password (asyncpg never puts it in messages).
        print(
            f"state-service migrate: PostgreSQL refused or is unreachable: {error}", file=sys.stderr
        )
        return 69  # EX_UNAVAILABLE
    from state_service.storage.postgres import SCHEMA_VERSION

    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}; schema at {SCHEMA_VERSION}")
    else:
        print(f"schema already at {SCHEMA_VERSION}; nothing to do")
    return 0


if __name__ == "__main__":
    main()
