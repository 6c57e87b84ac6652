"""Optional encryption of item content at rest: AES-256-GCM with per-tenant keys.

Keys come from a file (mounted from a Secret) of ``tenant:key_id:base64key``
lines; ``*`` as tenant applies to tenants without keys of their own. The first
key listed for a tenant encrypts new items; every listed key decrypts, so a
rotation is: put the new key first, keep the old one until its items expired.
The file is re-read when it changes.

Each sealed entry is bound to its tenant and session (GCM associated data), so
ciphertext copied to another session does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from state_service.errors import EncryptionIntegrity, EncryptionKeyUnavailable

logger = logging.getLogger("statecar.encryption")

# No plaintext payload starts with these bytes (log.py lists the formats), so
# plaintext and sealed entries coexist (encryption can be turned on later).
MARKER = b"\x00\x01"
NONCE_BYTES = 12


class KeyRing:
    def __init__(self, path: Path, *, recheck_seconds: float = 1.0) -> None:
        self.path = path
        self._recheck = recheck_seconds
        self._checked = time.monotonic()
        self._signature: tuple[float, int] | None = None
        self._active: dict[str, tuple[bytes, AESGCM]] = {}
        self._keys: dict[tuple[str, bytes], AESGCM] = {}
        self._load()

    def _load(self) -> None:
        stat = os.stat(self.path)
        signature = (stat.st_mtime, stat.st_size)
        if signature == self._signature:
            return
        active: dict[str, tuple[bytes, AESGCM]] = {}
        keys: dict[tuple[str, bytes], AESGCM] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                tenant, key_id, encoded = line.split(":", 2)
                secret = base64.b64decode(encoded, validate=True)
            except (ValueError, binascii.Error):
                raise ValueError(
                    f"{self.path}:{number}: expected tenant:key_id:base64key"
                ) from None
            if len(secret) != 32 or not key_id or len(key_id) > 64:
                raise ValueError(f"{self.path}:{number}: keys are 32 bytes, ids 1-64 chars")
            aead = AESGCM(secret)
            keys[(tenant, key_id.encode())] = aead
            active.setdefault(tenant, (key_id.encode(), aead))
        self._active, self._keys, self._signature = active, keys, signature
        logger.info("loaded %d encryption keys for %d tenants", len(keys), len(active))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked > self._recheck:
            self._checked = now
            try:
                self._load()
            except (OSError, ValueError):
                logger.exception("could not reload %s; keeping previous keys", self.path)

    def _scope(self, tenant: str) -> str:
        return tenant if tenant in self._active else "*"

    def seal(self, tenant: str, session_id: str, payload: bytes) -> bytes:
        self._refresh()
        scope = self._scope(tenant)
        if scope not in self._active:
            return payload  # no key for this tenant: stored as is
        key_id, aead = self._active[scope]
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, payload, _associated(tenant, session_id))
        return MARKER + bytes([len(key_id)]) + key_id + nonce + sealed

    def open(self, tenant: str, session_id: str, stored: bytes) -> bytes:
        if not stored.startswith(MARKER):
            return stored
        self._refresh()
        length = stored[len(MARKER)]
        start = len(MARKER) + 1
        key_id = stored[start : start + length]
        nonce = stored[start + length : start + length + NONCE_BYTES]
        sealed = stored[start + length + NONCE_BYTES :]
        aead = self._keys.get((tenant, key_id)) or self._keys.get(("*", key_id))
        if aead is None:
            raise EncryptionKeyUnavailable(
                f"an item is encrypted with key {key_id.decode(errors='replace')!r}, "
                "which is no longer configured"
            )
        try:
            return aead.decrypt(nonce, sealed, _associated(tenant, session_id))
        except InvalidTag:
            raise EncryptionIntegrity(
                "an item failed authentication (wrong key or tampered data)"
            ) from None


def _associated(tenant: str, session_id: str) -> bytes:
    return f"statecar/{tenant}/{session_id}".encode()
