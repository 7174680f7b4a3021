"""Run the stored suites on pandas frames in an ephemeral GX context, and build Data Docs.

The suites are loaded from the JSON files beside their builders (``events.json``, ...), which
``write_suites()`` regenerates from ``build_suite()``. GX runs with analytics and progress bars off
and ``result_format="COMPLETE"`` so that every unexpected row comes back by position.
Must not import ``flows/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from expectations import events, items, users

logger = logging.getLogger(__name__)

SUITES: dict[str, ModuleType] = {"events": events, "items": items, "users": users}
SUITE_DIR = Path(__file__).resolve().parent
_DOCS_SITE = "recloop"


def suite_path(name: str) -> Path:
    """Path of the stored JSON of suite ``name`` (beside its builder module)."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return SUITE_DIR / f"{name}.json"


def suite_to_json(suite: gx.ExpectationSuite) -> dict[str, Any]:
    """The stable JSON form of a suite (no ids, which GX assigns when a suite is added to a context)."""
    data = suite.to_json_dict()
    data.pop("id", None)
    for exp in data.get("expectations", []):
        exp.pop("id", None)
    return data


def write_suites(directory: Path | None = None) -> list[Path]:
    """Regenerate every ``<name>.json`` from its ``build_suite()``; returns the written paths."""
    paths = []
    for name, module in SUITES.items():
        path = (directory or SUITE_DIR) / f"{name}.json"
        path.write_text(json.dumps(suite_to_json(module.build_suite()), indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


def load_suite(name: str) -> gx.ExpectationSuite:
    """Load the stored suite ``name`` from its JSON file.

    Raises:
        KeyError: unknown suite name.
        FileNotFoundError: the JSON was never generated (run ``write_suites()``).
    """
    return gx.ExpectationSuite(**json.loads(suite_path(name).read_text()))


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, flattened for the gate.

    Attributes:
        key: a readable id, e.g. ``events.expect_column_values_to_be_between(value)``.
        on_fail: ``stop`` or ``quarantine`` (from the expectation's ``meta``).
        unexpected_rows: positions (0-based) of the failing rows in the validated frame.
    """

    key: str
    table: str
    type: str
    column: str | None
    on_fail: str
    success: bool
    unexpected_count: int
    unexpected_rows: list[int] = field(default_factory=list)
    observed_value: Any = None
    error: str | None = None


def _plain(value: Any) -> Any:
    """numpy / pandas scalars to JSON-able Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _flatten(table: str, result: Any) -> list[ExpectationOutcome]:
    out: list[ExpectationOutcome] = []
    seen: dict[str, int] = {}
    for r in result.results:
        cfg = r.expectation_config
        column = cfg.kwargs.get("column")
        key = f"{table}.{cfg.type}" + (f"({column})" if column else "")
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            key += f"#{seen[key]}"
        res = r.result or {}
        rows = [int(i) for i in res.get("unexpected_index_list") or []]
        exc = r.exception_info or {}
        error = (
            exc.get("exception_message") if isinstance(exc, dict) and exc.get("raised_exception") else None
        )
        out.append(
            ExpectationOutcome(
                key=key,
                table=table,
                type=cfg.type,
                column=column,
                on_fail=(cfg.meta or {}).get("on_fail", "stop"),
                success=bool(r.success),
                unexpected_count=int(res.get("unexpected_count") or (len(rows) if rows else 0)),
                unexpected_rows=rows,
                observed_value=_plain(res.get("observed_value")),
                error=error,
            )
        )
    return out


class SuiteRunner:
    """Validates frames against the stored suites in one ephemeral GX context.

    Keep one runner per batch: its in-memory validation results feed ``build_data_docs``.
    """

    def __init__(self) -> None:
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            progress_bars=ProgressBarsConfig(globally=False),
            analytics_enabled=False,
        )
        self.context = gx.get_context(project_config=config, mode="ephemeral")
        self._source = self.context.data_sources.add_pandas("recloop")
        self.results: dict[str, dict[str, Any]] = {}

    def run(
        self, table: str, frame: pd.DataFrame, parameters: dict[str, Any] | None = None
    ) -> list[ExpectationOutcome]:
        """Validate ``frame`` (rows indexed 0..n-1) against the stored suite ``table``.

        Args:
            table: suite name (``events``, ``items``, ``users``).
            frame: the frame to validate; its index must be a RangeIndex so that unexpected rows map
                to positions.
            parameters: suite parameter values (see the suite module's ``PARAMETERS``).
        Returns:
            One ``ExpectationOutcome`` per expectation, in GX's result order.
        Raises:
            ValueError: the frame index is not a 0..n-1 RangeIndex or a suite parameter is missing.
        """
        if not frame.index.equals(pd.RangeIndex(len(frame))):
            raise ValueError(
                f"{table}: frame index must be RangeIndex(0..{len(frame)}); call reset_index first"
            )
        missing = sorted(set(SUITES[table].PARAMETERS) - set(parameters or {}))
        if missing:
            raise ValueError(f"{table}: missing suite parameters {missing}")
        suite = self.context.suites.add(load_suite(table))
        batch = self._source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(f"{table}_batch")
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate_{table}", data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters or None,
            result_format={"result_format": "COMPLETE", "partial_unexpected_count": 20},
        )
        self.results[table] = result.to_json_dict()
        outcomes = _flatten(table, result)
        logger.info(
            "suite done table=%s rows=%d failed=%d", table, len(frame), sum(not o.success for o in outcomes)
        )
        return outcomes

    def build_data_docs(self, directory: Path) -> Path:
        """Render the suites and this runner's validation results as a static Data Docs site.

        Returns:
            Path of the site's ``index.html``.
        """
        directory.mkdir(parents=True, exist_ok=True)
        self.context.add_data_docs_site(
            site_name=_DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(directory),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        self.context.build_data_docs(site_names=[_DOCS_SITE])
        return directory / "index.html"
