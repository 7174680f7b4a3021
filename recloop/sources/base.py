"""The source registry, the ``SourceFrames`` container and careful file reading.

Every reader returns frames whose columns already carry the contract names (``recloop.contract``)
but whose values are raw: nothing is type-coerced or dropped, so a validation step can still see
(and quarantine) each bad row. Reading problems that make a file unusable as a whole (empty file,
wrong separator, wrong encoding, missing column) raise ``SourceError`` naming the file, the line
and the column.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from recloop.contract import ITEM_COLUMNS, USER_COLUMNS, ContractError

logger = logging.getLogger(__name__)

Reader = Callable[..., "SourceFrames"]
SOURCES: dict[str, Reader] = {}


class SourceError(ContractError):
    """A source file cannot be read as the source's format promises.

    The message names the file, the line (1-based, counting a header line) and the column where
    known, the rule broken and the offending value.
    """

    def __init__(
        self,
        file: str | Path,
        rule: str,
        *,
        table: str = "events",
        column: str | None = None,
        line: int | None = None,
        value: object = None,
    ) -> None:
        super().__init__(table, column or "*", rule)
        where = str(file)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        msg = f"{where}: {rule}"
        if value is not None:
            msg += f" (got {value!r})"
        self.args = (msg,)
        self.file, self.line, self.value = str(file), line, value


@dataclass
class SourceFrames:
    """Raw frames of one source, with contract column names.

    Attributes:
        events: one row per event, in file order (the recorded tie-break for equal timestamps).
        items: one row per item (may be empty with the contract columns).
        users: one row per user (may be empty with ``user_id`` only).
        meta: ``source``, ``path``, ``synthetic_timestamps``, ``rating_range`` and, for error
            messages, ``files`` (table -> file) and ``first_line`` (table -> line of row 0) or
            ``lines`` (table -> array of line numbers per row).
    """

    events: pd.DataFrame
    items: pd.DataFrame = field(default_factory=lambda: empty_items())
    users: pd.DataFrame = field(default_factory=lambda: empty_users())
    meta: dict[str, Any] = field(default_factory=dict)

    def locate(self, table: str, row: int) -> tuple[str, int | None]:
        """Return (file, 1-based line) of ``row`` (a 0-based position) of ``table``."""
        file = self.meta.get("files", {}).get(table, self.meta.get("path", "<memory>"))
        lines = self.meta.get("lines", {}).get(table)
        if lines is not None:
            return str(file), int(lines[row])
        first = self.meta.get("first_line", {}).get(table)
        return str(file), None if first is None else int(first) + row


def register(name: str) -> Callable[[Reader], Reader]:
    """Decorator adding a reader to ``SOURCES`` under ``name``."""

    def deco(fn: Reader) -> Reader:
        SOURCES[name] = fn
        return fn

    return deco


def empty_items() -> pd.DataFrame:
    """An empty raw items frame with the contract columns."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ITEM_COLUMNS})


def empty_users() -> pd.DataFrame:
    """An empty raw users frame with the contract columns."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in USER_COLUMNS})


def users_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """A users frame holding only the distinct raw ``user_id`` values of ``events``, in first-seen order."""
    return pd.DataFrame({"user_id": events["user_id"].drop_duplicates().to_numpy()})


def decode_file(path: Path, encoding: str) -> str:
    """Read ``path`` as text, strictly.

    Raises:
        FileNotFoundError: the file does not exist.
        SourceError: the file is empty, or a byte sequence is invalid in ``encoding`` (the message
            gives the line and byte offset and suggests another encoding).
    """
    if not path.is_file():
        raise FileNotFoundError(f"source file not found: {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise SourceError(path, "file is empty; expected at least one data row")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        hint = "latin-1" if encoding.lower().replace("-", "") == "utf8" else "utf-8"
        raise SourceError(
            path,
            f"byte {err.start} is not valid {encoding} ({err.reason}); is the file {hint}? "
            f"pass encoding='{hint}' if so",
            line=line,
            value=raw[err.start : err.start + 4],
        ) from err


def _guess_separator(first_line: str, expected: str) -> str | None:
    counts = {sep: first_line.count(sep) for sep in ("\t", "|", ",", ";", "::", " ") if sep != expected}
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] > 0 else None


def read_table(
    path: Path,
    *,
    sep: str,
    names: list[str] | None = None,
    encoding: str = "utf-8",
    required: list[str] | None = None,
    dtype: dict[str, Any] | None = None,
    table: str = "events",
) -> pd.DataFrame:
    """Read a delimited text file into raw columns, with errors that name the file and line.

    Args:
        path: the file.
        sep: the field separator; a multi-character separator such as ``::`` is supported.
        names: column names for a headerless file (``None``: the first line is the header).
        encoding: the text encoding, enforced strictly.
        required: columns the header must contain (ignored for headerless files, which must have
            exactly ``len(names)`` fields on their first line).
        dtype: passed to pandas (e.g. ``{"user_id": str}`` to keep ids verbatim).
        table: contract table, for error messages.
    Returns:
        A DataFrame of raw values (pandas type inference only), one row per non-blank line.
    Raises:
        SourceError: empty file, wrong separator, missing column, ragged lines, bad encoding.
    """
    text = decode_file(path, encoding)
    if len(sep) > 1:
        text = text.replace(sep, "\x1f")
        sep = "\x1f"
    first = text.lstrip("\ufeff").splitlines()[0]
    shown_sep = "\\t" if sep == "\t" else sep
    n_fields = first.count(sep) + 1
    if names is not None and n_fields != len(names):
        guess = _guess_separator(first, sep)
        rule = f"expected {len(names)} '{shown_sep}'-separated fields {names}, found {n_fields}"
        if n_fields < len(names) and guess:
            rule += f"; wrong separator? the line looks {guess!r}-separated"
        elif n_fields < len(names):
            rule += f"; missing column {names[n_fields]!r}"
        raise SourceError(path, rule, table=table, line=1, value=first[:80])
    try:
        df = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            header=None if names is not None else 0,
            names=names,
            index_col=False,
            dtype=dtype,
            engine="c",
            quoting=3 if names is not None else 0,  # headerless MovieLens files never quote
            encoding_errors="strict",
        )
    except pd.errors.ParserError as err:
        raise SourceError(path, f"malformed '{shown_sep}'-separated line: {err}", table=table) from err
    except pd.errors.EmptyDataError as err:
        raise SourceError(path, "file is empty; expected at least one data row", table=table) from err
    if names is None:
        df.columns = [str(c).lstrip("\ufeff").strip() for c in df.columns]
        missing = [c for c in (required or []) if c not in df.columns]
        if missing:
            guess = _guess_separator(first, sep)
            rule = f"missing column {missing[0]!r}; header has {list(df.columns)}"
            if len(df.columns) == 1 and guess:
                rule += f"; wrong separator? the header looks {guess!r}-separated, expected '{shown_sep}'"
            raise SourceError(path, rule, table=table, column=missing[0], line=1)
    if df.empty:
        raise SourceError(path, "file has no data rows", table=table)
    return df
