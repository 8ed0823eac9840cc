"""Receive a multipart/form-data upload: file parts stream to temporary files under a byte limit.

Starlette's own form parser spools files to the system temp directory with no size bound, so a
model upload is parsed here instead: each file part goes to a file in ``spool_dir`` (on the
same disk as the artifact store), the sum of file bytes is capped, and text fields are small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from fleet_service.artifacts.errors import ReleaseInvalidError, UploadTooLargeError

__all__ = ["MAX_FIELD_BYTES", "ReceivedFile", "ReceivedUpload", "receive_multipart"]

# Text fields carry a name, a version, a few numbers: 64 KiB is generous and bounds memory.
MAX_FIELD_BYTES = 64 * 1024
# After refusing an oversized upload, read (and drop) up to this much more of the body so the
# client gets to read the 413 instead of a connection reset; past it the connection is closed.
DRAIN_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedFile:
    """One file part, now a temporary file."""

    part: str
    filename: str
    path: Path
    size: int


@dataclass
class ReceivedUpload:
    """Text fields and file parts of one upload; call :meth:`cleanup` when done."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Remove the temporary files."""
        for received in self.files.values():
            received.path.unlink(missing_ok=True)


class _Receiver:
    """python-multipart callbacks writing parts where they belong (run off the event loop)."""

    def __init__(
        self,
        spool_dir: Path,
        max_file_bytes: int,
        file_parts: Collection[str],
        field_parts: Collection[str],
    ) -> None:
        self.spool_dir = spool_dir
        self.max_file_bytes = max_file_bytes
        self.file_parts = file_parts
        self.field_parts = field_parts
        self.upload = ReceivedUpload()
        self.file_bytes = 0
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._part = ""
        self._filename: str | None = None
        self._text = bytearray()
        self._handle: BinaryIO | None = None
        self._path: Path | None = None
        self._size = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._text.clear()
        self._filename = None
        self._size = 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ReleaseInvalidError("a multipart part has no name in its Content-Disposition")
        self._part = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self._part not in self.file_parts:
                raise ReleaseInvalidError(
                    f"unexpected file part {self._part!r}: send files as "
                    f"{', '.join(sorted(self.file_parts))}"
                )
            if self._part in self.upload.files:
                raise ReleaseInvalidError(f"the file part {self._part!r} was sent twice")
            raw = options[b"filename"].decode("utf-8", "replace")
            # Browsers on Windows once sent the whole path: keep the last component only.
            self._filename = PurePosixPath(raw.replace("\\", "/")).name
            fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="upload-")
            self._handle = os.fdopen(fd, "wb")
            self._path = Path(name)
        elif self._part not in self.field_parts:
            raise ReleaseInvalidError(
                f"unexpected field {self._part!r}: the fields are "
                f"{', '.join(sorted(self.field_parts))}"
            )
        elif self._part in self.upload.fields:
            raise ReleaseInvalidError(f"the field {self._part!r} was sent twice")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._handle is None:
            if len(self._text) + len(piece) > MAX_FIELD_BYTES:
                raise ReleaseInvalidError(
                    f"field {self._part!r} is longer than {MAX_FIELD_BYTES} bytes"
                )
            self._text += piece
            return
        self.file_bytes += len(piece)
        if self.file_bytes > self.max_file_bytes:
            raise UploadTooLargeError(
                f"the upload's files pass the limit of {self.max_file_bytes} bytes "
                "(max_artifact_bytes); raise the setting or upload a smaller model"
            )
        self._handle.write(piece)
        self._size += len(piece)

    def _part_end(self) -> None:
        if self._handle is None:
            self.upload.fields[self._part] = self._text.decode("utf-8", "replace")
            return
        self._handle.close()
        assert self._path is not None and self._filename is not None
        self.upload.files[self._part] = ReceivedFile(
            self._part, self._filename, self._path, self._size
        )
        self._handle = None
        self._path = None

    def _end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        """Drop what was received so far."""
        if self._handle is not None:
            self._handle.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self.upload.cleanup()


async def receive_multipart(
    headers: Mapping[str, str],
    stream: AsyncIterator[bytes],
    *,
    spool_dir: Path,
    max_file_bytes: int,
    file_parts: Collection[str],
    field_parts: Collection[str],
) -> ReceivedUpload:
    """Parse a multipart body from ``stream`` into files in ``spool_dir`` (which must exist).

    413 past ``max_file_bytes`` of file data, 422 for anything malformed or unexpected. The
    caller owns the result and must call its ``cleanup``.
    """
    content_type, options = parse_options_header(headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise ReleaseInvalidError(
            "send the model as multipart/form-data (fields and files), e.g. curl -F", status=415
        )
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_file_bytes + 16 * MAX_FIELD_BYTES:
        await _drain(stream)
        raise UploadTooLargeError(
            f"the upload declares {declared} bytes, past the limit of {max_file_bytes} "
            "(max_artifact_bytes); raise the setting or upload a smaller model"
        )
    receiver = _Receiver(spool_dir, max_file_bytes, file_parts, field_parts)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in stream:
            await asyncio.to_thread(parser.write, chunk)
        if not receiver.ended:
            raise ReleaseInvalidError("the upload was cut short (no closing multipart boundary)")
    except FormParserError as exc:
        receiver.abort()
        raise ReleaseInvalidError(f"the body is not valid multipart/form-data: {exc}") from exc
    except (ReleaseInvalidError, UploadTooLargeError):
        receiver.abort()
        with contextlib.suppress(Exception):  # the answer matters more than the rest of the body
            await _drain(stream)
        raise
    except BaseException:
        receiver.abort()
        raise
    return receiver.upload


async def _drain(stream: AsyncIterator[bytes]) -> None:
    drained = 0
    async for chunk in stream:
        drained += len(chunk)
        if drained > DRAIN_MAX_BYTES:
            return
