"""TLS for the gRPC servers and clients, certificates from files.

Server certificates are re-read when their files change: gRPC asks for the
current configuration at each new TLS handshake, so a rotated certificate
(e.g. a renewed cert-manager Secret) is served without a restart.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

logger = logging.getLogger("statecar.tls")


class ReloadingServerCredentials:
    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._files = [cert_file, key_file] + ([client_ca_file] if client_ca_file else [])
        self._cert_file = cert_file
        self._key_file = key_file
        self._client_ca_file = client_ca_file
        self._signature = self._stat()
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            self._fetch,  # type: ignore[arg-type]  # None = "unchanged" per gRPC docs
            require_client_authentication=client_ca_file is not None,
        )

    def _stat(self) -> tuple[tuple[float, int], ...]:
        return tuple((os.stat(f).st_mtime, os.stat(f).st_size) for f in self._files)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self._key_file.read_bytes(), self._cert_file.read_bytes())],
            root_certificates=self._client_ca_file.read_bytes() if self._client_ca_file else None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return None
            configuration = self._configuration()
        except OSError:
            logger.exception("could not reload TLS files; keeping the current certificate")
            return None
        self._signature = signature
        logger.info("reloaded TLS certificate from %s", self._cert_file)
        return configuration


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS: trust `ca_file` (system roots if None); present a client
    certificate when cert and key are given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file else None,
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )
