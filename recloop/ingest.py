"""Ingestion: read a source strictly and append it to the lake as one batch.

The CLI (``recloop ingest``) and the ingest flow call ``ingest_source``; both stay thin.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from recloop.lake import IngestReport, Lake
from recloop.sources import load_source

logger = logging.getLogger(__name__)


def ingest_source(
    name: str,
    path: Path | None,
    lake_root: Path,
    *,
    batch_id: str | None = None,
    **options: Any,
) -> IngestReport:
    """Load source ``name`` (strict coercion) and ingest it into the lake at ``lake_root``.

    Args:
        name: a ``recloop.sources.SOURCES`` key.
        path: file or folder (None: MovieLens downloads into the cache; synthetic needs none).
        lake_root: the lake folder (``settings.lake_path`` at the edges).
        batch_id: optional batch id.
        options: passed to the source reader (e.g. ``seed`` for synthetic, ``columns`` for csv).
    Returns:
        The lake's ``IngestReport``.
    Raises:
        SourceError: the source has a bad file or row (named in the message); nothing is written.
        ValueError: conflicting event ids or a reused batch id; nothing is written.
    """
    frames = load_source(name, path, **options)
    report = Lake(lake_root).ingest(frames, batch_id=batch_id)
    logger.info(
        "ingested source=%s events=%d new_events=%d duplicates_dropped=%d",
        name, report.events, report.new_events, report.duplicates_dropped,
    )  # fmt: skip
    return report
