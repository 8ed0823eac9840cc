"""Sealed (encrypted) model files: AES-256-GCM over fixed-size chunks, streamable both ways.

A whole-file GCM would need the whole model in memory on a Raspberry Pi to check one tag, so
files are sealed in chunks, the online-AE construction of Tink's streaming AEAD ("STREAM",
Hoang et al. 2015) built from `cryptography`'s AESGCM primitive::

    header  = b"EFSEAL1\\n" + nonce_prefix (7 random bytes)
    chunk i = AESGCM(key).encrypt(nonce_prefix + i (4 bytes, big-endian) + last (1 byte), plain_i)

Every chunk holds ``CHUNK_SIZE`` plaintext bytes except the last, which is flagged in its nonce,
so a reordered, dropped or truncated chunk fails authentication instead of decrypting to a
shorter model. A key is fresh per model version (the service draws it), so a random prefix
never repeats under one key.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CHUNK_SIZE",
    "KEY_BYTES",
    "SealError",
    "Sealer",
    "Unsealer",
    "new_key",
    "seal_chunks",
    "sealed_size",
    "unseal_chunks",
]

MAGIC = b"EFSEAL1\n"
_PREFIX_BYTES = 7
_TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + _PREFIX_BYTES
# 1 MiB keeps the per-chunk overhead (16 bytes) negligible and the working set small on a Pi.
CHUNK_SIZE = 1024 * 1024
KEY_BYTES = 32


class SealError(ValueError):
    """Sealed bytes are damaged, truncated or were sealed under another key."""


def new_key() -> bytes:
    """A fresh AES-256 key."""
    return AESGCM.generate_key(bit_length=256)


def sealed_size(plain_size: int) -> int:
    """How many bytes sealing ``plain_size`` plaintext bytes produces."""
    chunks = max(1, -(-plain_size // CHUNK_SIZE))
    return HEADER_BYTES + plain_size + _TAG_BYTES * chunks


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class Sealer:
    """Seals a plaintext stream fed in pieces of any size."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a sealing key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._prefix = os.urandom(_PREFIX_BYTES)
        self._buffer = bytearray()
        self._index = 0
        self._started = False

    def feed(self, data: bytes) -> bytes:
        """Sealed bytes ready so far (the header first)."""
        out = bytearray()
        if not self._started:
            out += MAGIC + self._prefix
            self._started = True
        self._buffer += data
        # Keep at least one byte back: only ``finish`` knows which chunk is the last.
        while len(self._buffer) > CHUNK_SIZE:
            out += self._seal(bytes(self._buffer[:CHUNK_SIZE]), last=False)
            del self._buffer[:CHUNK_SIZE]
        return bytes(out)

    def finish(self) -> bytes:
        """The remaining sealed bytes, ending with the flagged last chunk."""
        head = self.feed(b"")
        last = self._seal(bytes(self._buffer), last=True)
        self._buffer.clear()
        return head + last

    def _seal(self, plain: bytes, *, last: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, last), plain, None)
        self._index += 1
        return sealed


class Unsealer:
    """Opens a sealed stream fed in pieces of any size; raises :class:`SealError` on damage."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SealError(f"a sealing key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._prefix: bytes | None = None
        self._buffer = bytearray()
        self._index = 0

    def feed(self, data: bytes) -> bytes:
        """Plaintext authenticated so far."""
        self._buffer += data
        if self._prefix is None:
            if len(self._buffer) < HEADER_BYTES:
                return b""
            if bytes(self._buffer[: len(MAGIC)]) != MAGIC:
                raise SealError("not a sealed edgefleet file (bad header)")
            self._prefix = bytes(self._buffer[len(MAGIC) : HEADER_BYTES])
            del self._buffer[:HEADER_BYTES]
        out = bytearray()
        sealed_chunk = CHUNK_SIZE + _TAG_BYTES
        while len(self._buffer) > sealed_chunk:
            out += self._open(bytes(self._buffer[:sealed_chunk]), last=False)
            del self._buffer[:sealed_chunk]
        return bytes(out)

    def finish(self) -> bytes:
        """The last plaintext; raises :class:`SealError` if the stream was cut short."""
        head = self.feed(b"")
        if self._prefix is None or len(self._buffer) < _TAG_BYTES:
            raise SealError("sealed file is truncated")
        tail = self._open(bytes(self._buffer), last=True)
        self._buffer.clear()
        return head + tail

    def _open(self, sealed: bytes, *, last: bool) -> bytes:
        assert self._prefix is not None
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, self._index, last), sealed, None)
        except InvalidTag as exc:
            raise SealError(
                f"chunk {self._index} failed authentication: the file is damaged, truncated "
                "or sealed under another key"
            ) from exc
        self._index += 1
        return plain


def seal_chunks(plain: Iterable[bytes], key: bytes) -> Iterator[bytes]:
    """Seal an iterable of plaintext pieces."""
    sealer = Sealer(key)
    for piece in plain:
        if out := sealer.feed(piece):
            yield out
    yield sealer.finish()


def unseal_chunks(sealed: Iterable[bytes], key: bytes) -> Iterator[bytes]:
    """Open an iterable of sealed pieces; raises :class:`SealError` on damage."""
    unsealer = Unsealer(key)
    for piece in sealed:
        if out := unsealer.feed(piece):
            yield out
    yield unsealer.finish()
