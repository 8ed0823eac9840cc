"""HTTP ``Range`` for artifact downloads: one byte range, as resuming downloaders send it."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ByteRange", "RangeNotSatisfiable", "parse_range"]

_SINGLE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(ValueError):  # noqa: N818  (named after the HTTP status it becomes)
    """The range starts at or past the end of the blob (HTTP 416)."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of a blob of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range ``header`` asks for, or None to send the whole blob.

    A header that is malformed or asks for several ranges is ignored, as RFC 9110 allows (the
    whole blob is sent); one that starts past the end raises RangeNotSatisfiable.
    """
    if not header:
        return None
    match = _SINGLE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)  # "bytes=-N": the last N bytes
        if suffix == 0:
            raise RangeNotSatisfiable("an empty suffix range asks for no bytes")
        return ByteRange(max(0, size - suffix), size, size)
    start = int(first)
    if last and int(last) < start:
        return None  # last before first: syntactically invalid, ignored
    end = size if not last else int(last) + 1
    if start >= size:
        raise RangeNotSatisfiable(f"the range starts at byte {start}; the artifact has {size}")
    return ByteRange(start, min(end, size), size)
