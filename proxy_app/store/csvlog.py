"""The one CSV format (``values_cells``, ``cells``, ``iter_csv``) and the CSV mirror of the calls table (``CsvLog``).

RFC 4180 through the ``csv`` module, columns in ``calls.COLUMNS`` order, the header once per file. The mirror, the
dashboard's export (export.py) and the ``export-csv`` command all turn a row into cells here, so their bytes agree.
Appends take a cross-process file lock so several gunicorn workers never interleave rows; the file is rotated by size
and by UTC day, and rotated files older than the retention period are deleted. It does not read the database or
decide what a row holds, and only the writer thread of each process calls ``append``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from proxy_app.calls import COLUMNS, Call, format_timestamp, values_of

# Why: a spreadsheet runs a text cell starting with one of these signs as a formula (CSV injection), some also after
# leading whitespace, line breaks or invisible characters, and some read the full-width signs as the ASCII ones; a
# tab or CR in front is suspect on its own. A leading apostrophe makes such a cell plain text. Only text columns are
# touched: a number such as -5 stays a number.
FORMULA_SIGNS = "=+-@\uff1d\uff0b\uff0d\uff20"
_SPACES = "".join(char for char in map(chr, range(0x3001)) if char.isspace())  # every one lies below U+3001
# Invisible characters: soft hyphen, Arabic letter mark, Mongolian vowel separator, zero-width spaces and joiners,
# direction marks, embeddings and isolates, word joiner, invisible operators, and the BOM (zero-width no-break space).
_INVISIBLE = "\u00ad\u061c\u180e\ufeff" + "".join(
    map(chr, [*range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x2070)])
)
_FORMULA = re.compile(f"[\t\r]|[{re.escape(_SPACES + _INVISIBLE)}]*[{re.escape(FORMULA_SIGNS)}]")
_MAY_START_FORMULA = frozenset(FORMULA_SIGNS + _SPACES + _INVISIBLE)  # a cheap first look before the pattern
STREAM_AT = COLUMNS.index("stream_mode")
COLD_AT = COLUMNS.index("cold_start")  # a boolean that may be unknown (an empty cell)
TEXT_AT = tuple(  # the text columns: only text can start a formula
    index
    for index, (name, hint) in enumerate(typing.get_type_hints(Call).items())
    if str in (typing.get_args(hint) or (hint,))
)


def iter_csv(rows: Iterable) -> Iterator[str]:
    """Yield the header line, then one CSV line per row (a Call, a model instance or a mapping keyed by column)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    yield _drain(buffer)
    for row in rows:
        writer.writerow(cells(row))
        yield _drain(buffer)


def _lines(rows: Iterable) -> str:
    """The lines ``iter_csv`` yields for these rows, in one string."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(map(cells, rows))
    return buffer.getvalue()


def cells(row) -> list:
    """Return one row's CSV cells in COLUMNS order: None is empty, booleans true/false, times ISO 8601 UTC."""
    return values_cells([row.get(name) for name in COLUMNS] if isinstance(row, Mapping) else values_of(row))


def values_cells(values: Sequence) -> list:
    """Return the cells of one row given as its values in COLUMNS order (a Call's, or a stored row's without its id).

    The one formatting step behind every CSV this proxy writes, kept to one tight loop: the export runs it per row.
    The csv module writes None as an empty cell and numbers as they are.
    """
    row = list(values)
    row[0] = _timestamp(row[0])
    row[STREAM_AT] = "true" if row[STREAM_AT] else "false"
    if row[COLD_AT] is not None:
        row[COLD_AT] = "true" if row[COLD_AT] else "false"
    for index in TEXT_AT:
        text = row[index]
        if text and text[0] in _MAY_START_FORMULA and _FORMULA.match(text):
            row[index] = "'" + text
    return row


def _timestamp(value) -> str:
    """ISO 8601 UTC with milliseconds from a datetime (naive means UTC) or SQLite's stored text."""
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " ":  # YYYY-MM-DD HH:MM:SS.ffffff: cut and pasted rather than parsed
            return f"{value[:10]}T{value[11:23]}Z"
        value = datetime.fromisoformat(value)
    return format_timestamp(value.astimezone(UTC) if value.tzinfo else value)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


HEADER = next(iter_csv(()))


class CsvLog:
    """The mirror file: ``append`` adds rows (rotating first when due), ``prune`` deletes old rotated files."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 0, clock=lambda: datetime.now(UTC)) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes  # 0: rotate by day only
        self.clock = clock
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        # Rotated files are named <stem>.<UTC time of their last row><suffix>, e.g. ollama-proxy.2025-05-01T134510Z.csv
        stamp = r"\.\d{4}-\d\d-\d\dT\d{6}Z(\.\d+)?"
        self._rotated = re.compile(re.escape(self.path.stem) + stamp + re.escape(self.path.suffix))
        self._header_checked: tuple[int, int] | None = None  # (device, inode) of the file whose header was checked

    def append(self, rows: Iterable) -> None:
        """Append rows in one write under the file lock; a new (or just rotated) file gets the header first."""
        lines = _lines(rows)
        try:
            self._append(lines)
        except FileNotFoundError:  # the directory is gone (or was never made): make it, once per such failure
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(lines)

    def _append(self, lines: str) -> None:
        with locked(self.lock_path, make_parent=False):
            self._rotate_if_due()
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                handle.write(lines if handle.tell() else HEADER + lines)

    def _rotate_if_due(self) -> Path | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        if not stat.st_size:
            return None
        last_write = datetime.fromtimestamp(stat.st_mtime, UTC)
        too_big = self.max_bytes and stat.st_size >= self.max_bytes
        if too_big or last_write.date() < self.clock().date() or not self._has_current_header(stat):
            target = self._free_name(last_write)
            os.replace(self.path, target)
            return target
        return None

    def _has_current_header(self, stat: os.stat_result) -> bool:
        """False when the file was started by an older version with other columns: it then gets a file of its own.

        Each file is read once: a file this process has checked keeps its device and inode until it is rotated.
        """
        identity = (stat.st_dev, stat.st_ino)
        if identity == self._header_checked:
            return True
        with open(self.path, newline="", encoding="utf-8", errors="replace") as handle:
            current = handle.readline() == HEADER
        self._header_checked = identity if current else None
        return current

    def _free_name(self, moment: datetime) -> Path:
        base = f"{self.path.stem}.{moment:%Y-%m-%dT%H%M%S}Z"
        target, number = self.path.with_name(base + self.path.suffix), 0
        while target.exists():
            number += 1
            target = self.path.with_name(f"{base}.{number}{self.path.suffix}")
        return target

    def rotated_files(self) -> list[Path]:
        """Return the rotated files next to the mirror, oldest name first."""
        if not self.path.parent.is_dir():
            return []
        return sorted(entry for entry in self.path.parent.iterdir() if self._rotated.fullmatch(entry.name))

    def prune(self, cutoff: datetime) -> list[Path]:
        """Delete rotated files whose last row was written before ``cutoff``; return them. The live file stays."""
        deleted = []
        with locked(self.lock_path):
            for entry in self.rotated_files():
                if datetime.fromtimestamp(entry.stat().st_mtime, UTC) < cutoff:
                    entry.unlink(missing_ok=True)
                    deleted.append(entry)
        return deleted


@contextmanager
def locked(path: Path, make_parent: bool = True):
    """Hold an exclusive lock on ``path`` (created if needed) across processes: flock on POSIX, msvcrt on Windows."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            yield from _locked_windows(handle)
            return
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _locked_windows(handle):  # pragma: no cover - exercised on Windows only
    import msvcrt

    handle.seek(0)
    while True:
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # retries for about 10 s, then raises: try again
            break
        except OSError:
            continue
    try:
        yield
    finally:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
