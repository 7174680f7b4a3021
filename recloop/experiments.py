"""Online experiments: the champion against one challenger, by A/B test or by interleaving.

"Online experiment" (to keep it apart from MLflow experiments): serving splits users between the
version the champion alias pointed to when the experiment started (arm ``champion``) and a challenger
version (arm ``challenger``), either by showing each user one arm's list (``mode="ab"``) or by
interleaving both lists for every user (``mode="interleave"``, where the weights are not used). One
online experiment runs at a time.

- ``OnlineExperiment``: the definition and state of one experiment (a frozen value).
- ``assign_arm``: the deterministic user → arm assignment (pure; a user keeps one arm for the whole
  experiment, in every worker and replica, with no state to share but the salt).
- ``ExperimentStore``: the experiments table of the event-log database (``recloop.logdb``, revision
  0003; 0004 adds each arm's exploration policy, 0007 its re-ranking): ``start`` (refused while one runs),
  ``active`` (the running one: one indexed read, cheap enough for every serving worker to poll every few seconds),
  ``stop``, ``conclude`` (stores the result JSON), ``get``, ``latest``, ``list``.

Lifecycle: ``running`` → ``stopped`` (serving goes back to the champion for everyone) → ``concluded``
(the analysis and its decision are stored; a running experiment may be concluded directly).
The analysis lives in ``recloop.experiment_analysis``, the conclusion and promotion in
``flows/experiment.py``, the commands in ``recloop experiment ...``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, select, text, update

from recloop.logdb import (
    EXPLORATION_CHARS,
    MODEL_VERSION_CHARS,
    RERANK_CHARS,
    SALT_CHARS,
    LogTableStore,
)

#: The ways to run an experiment: one arm per user (A/B) or both arms interleaved in every list.
MODES = ("ab", "interleave")
#: The two arms; ``assign_arm`` returns one of them.
ARMS = ("champion", "challenger")
RUNNING, STOPPED, CONCLUDED = "running", "stopped", "concluded"
STATUSES = (RUNNING, STOPPED, CONCLUDED)
DEFAULT_WEIGHTS = (50.0, 50.0)
_SEPARATOR = "\x1f"  # between salt and user id: ("ab", "c") and ("a", "bc") must not collide
_TWO_64 = float(2**64)


class ExperimentError(Exception):
    """An online-experiment operation that the experiments' state does not allow."""


class ExperimentConflict(ExperimentError):
    """One experiment is already running (``start``), or the experiment is past the requested state."""


class NoRunningExperiment(ExperimentError, LookupError):
    """No online experiment is running (``stop`` without an id)."""


class UnknownExperiment(ExperimentError, LookupError):
    """No online experiment has this id."""


@dataclass(frozen=True)
class OnlineExperiment:
    """One online experiment: champion version against challenger version.

    Attributes:
        experiment_id: "exp-" + 12 hex digits.
        mode: "ab" (each user sees one arm's list) or "interleave" (both lists merged for every user).
        champion_version / challenger_version: the registered model versions of the two arms.
        weights: (champion, challenger) relative traffic weights of an A/B test (> 0).
        salt: the assignment salt (``assign_arm``).
        status: "running", "stopped" or "concluded".
        started_at / stopped_at / concluded_at: tz-aware UTC times (the last two None until then).
        result: the conclusion's report (JSON-friendly dict), None until concluded.
        exploration: (champion, challenger) exploration policy texts of the arms
            (``models.exploration.ExplorationPolicy.parse``, e.g. "epsilon:0.1"); None = the service's
            global policy (``settings.exploration``).
        rerank: (champion, challenger) re-ranking texts of the arms ("mmr:0.3", "dpp:0.5": the method and its
            diversity in [0, 1], ``parse_rerank``); None = none unless the request asks for it. A request's own
            ``diversity``/``reranker`` wins over its arm's (revision 0007).
    """

    experiment_id: str
    mode: str
    champion_version: str
    challenger_version: str
    weights: tuple[float, float]
    salt: str
    status: str
    started_at: datetime
    stopped_at: datetime | None = None
    concluded_at: datetime | None = None
    result: dict[str, Any] | None = field(default=None, compare=False)
    exploration: tuple[str | None, str | None] = (None, None)
    rerank: tuple[str | None, str | None] = (None, None)

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def version_of(self, arm: str) -> str:
        """The model version of ``arm`` ("champion" | "challenger")."""
        if arm == "champion":
            return self.champion_version
        if arm == "challenger":
            return self.challenger_version
        raise ValueError(f"arm={arm!r}; expected one of {ARMS}")

    def arm_of(self, user_id: str) -> str:
        """The arm ``user_id`` is assigned to in this experiment (``assign_arm`` with its salt and weights)."""
        return assign_arm(self.salt, user_id, self.weights)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OnlineExperiment:
        """The inverse of ``as_dict`` (ISO times with an offset; naive means UTC)."""
        return cls(
            experiment_id=str(data["experiment_id"]), mode=str(data["mode"]),
            champion_version=str(data["champion_version"]), challenger_version=str(data["challenger_version"]),
            weights=_weights(data["weights"]), salt=str(data["salt"]), status=str(data["status"]),
            started_at=_parse_time(data["started_at"]), stopped_at=_parse_time(data.get("stopped_at")),
            concluded_at=_parse_time(data.get("concluded_at")), result=data.get("result"),
            exploration=_exploration_pair(data.get("exploration")),
            rerank=_rerank_pair(data.get("rerank")),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: times as ISO 8601 strings (or None), weights and exploration as lists."""
        return {
            "experiment_id": self.experiment_id,
            "mode": self.mode,
            "champion_version": self.champion_version,
            "challenger_version": self.challenger_version,
            "weights": [float(w) for w in self.weights],
            "salt": self.salt,
            "status": self.status,
            "started_at": _iso(self.started_at),
            "stopped_at": _iso(self.stopped_at),
            "concluded_at": _iso(self.concluded_at),
            "result": self.result,
            "exploration": list(self.exploration),
            "rerank": list(self.rerank),
        }


def assign_arm(salt: str, user_id: str, weights: tuple[float, float] = DEFAULT_WEIGHTS) -> str:
    """The arm of ``user_id``: "champion" or "challenger", the same every time for the same inputs.

    ``u = int(sha256(salt + "\\x1f" + user_id)[:8]) / 2**64`` is uniform on [0, 1) across users; the user
    is in the champion arm when ``u < w_champion / (w_champion + w_challenger)``. No state: every
    worker and replica agrees, and a user stays in one arm for the whole experiment (its salt and
    weights are fixed at start). A new salt reshuffles users independently of the previous split.

    Args:
        salt: the experiment's salt.
        user_id: the user (as served; ids are normalised upstream).
        weights: (champion, challenger) relative weights, each > 0 and finite (e.g. (90, 10)).
    Raises:
        ValueError: a weight is not positive and finite.
    """
    w_champion, w_challenger = weights
    if not (0 < w_champion < math.inf and 0 < w_challenger < math.inf):
        raise ValueError(f"weights={weights!r}; expected two positive finite numbers")
    digest = hashlib.sha256(f"{salt}{_SEPARATOR}{user_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / _TWO_64
    return "champion" if u < w_champion / (w_champion + w_challenger) else "challenger"


class ExperimentStore(LogTableStore):
    """The online experiments in the event-log database at SQLAlchemy ``url`` (``settings.event_log_uri``).

    Args:
        url: e.g. ``sqlite:///home/eventlog.db`` or ``postgresql+psycopg://user@host/db``.
        events_table: the events table's name; the experiments table's name derives from it
            (``recloop.logdb.table_names``: "events" → "experiments").
        create: migrate the schema to head first (``recloop.logdb.upgrade``).
    Raises:
        sqlalchemy.exc.SQLAlchemyError: with ``create``, the database is unreachable or a migration failed.
    """

    TABLE = "experiments"

    # ---- writes (each one transaction under the experiments' lock) -----------------------------------
    def start(
        self,
        *,
        mode: str,
        champion_version: str,
        challenger_version: str,
        weights: tuple[float, float] = DEFAULT_WEIGHTS,
        salt: str | None = None,
        now: datetime | None = None,
        exploration: tuple[str | None, str | None] = (None, None),
        parse_exploration: Callable[[str], object] | None = None,
        rerank: tuple[str | None, str | None] = (None, None),
    ) -> OnlineExperiment:
        """Start an online experiment; refused while another one runs.

        The check and the insert are one transaction under the experiments' lock
        (``pg_advisory_xact_lock`` on PostgreSQL, the database write lock on SQLite), so of two
        concurrent starts exactly one succeeds.

        Args:
            mode: "ab" or "interleave".
            champion_version / challenger_version: two different registered versions (at most 64 chars).
            weights: (champion, challenger) traffic weights of an A/B test, each > 0 and finite.
            salt: the assignment salt (default a new random 32-hex-digit string).
            now: the start time (default now, UTC; naive means UTC).
            exploration: (champion, challenger) exploration policy texts, e.g. ("epsilon:0.1", None); None
                (or "") = the service's global policy. Stored stripped, at most 64 printable characters.
            parse_exploration: the parser each text must pass: ``models.exploration.ExplorationPolicy.parse``
                (the CLI passes it; the kernel does not import ``models/``). None: only the policy name is
                checked (greedy | epsilon | plackett_luce); serving parses the text when it loads the arms.
            rerank: (champion, challenger) re-ranking texts, e.g. ("mmr:0.3", None) (``parse_rerank``); None
                (or "") = no re-ranking unless a request asks for it.
        Returns:
            The running experiment (``experiment_id`` = "exp-" + 12 hex digits).
        Raises:
            ValueError: a bad mode, weights, versions, salt, exploration or re-ranking text.
            ExperimentConflict: an experiment is running (its id is in the message).
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        weights = _weights(weights)
        champion = _version("champion_version", champion_version)
        challenger = _version("challenger_version", challenger_version)
        if champion == challenger:
            raise ValueError(f"champion and challenger are the same version ({champion}); expected two versions")
        salt = secrets.token_hex(16) if salt is None else str(salt)
        if not salt or len(salt) > SALT_CHARS or not salt.isprintable():
            raise ValueError(f"salt must be 1..{SALT_CHARS} printable characters")
        explore = _exploration_pair(exploration, parse_exploration)
        reranks = _rerank_pair(rerank)
        experiment = OnlineExperiment(
            experiment_id="exp-" + secrets.token_hex(6), mode=mode, champion_version=champion,
            challenger_version=challenger, weights=weights, salt=salt, status=RUNNING, started_at=_now(now),
            exploration=explore, rerank=reranks,
        )
        with self._locked() as conn:
            running = conn.execute(
                select(self.table.c.experiment_id).where(self.table.c.status == RUNNING).limit(1)
            ).scalar()
            if running is not None:
                raise ExperimentConflict(f"online experiment {running} is running; stop or conclude it first")
            conn.execute(self.table.insert().values(
                experiment_id=experiment.experiment_id, mode=mode, champion_version=champion,
                challenger_version=challenger, weight_champion=weights[0], weight_challenger=weights[1],
                salt=salt, status=RUNNING, started_at=experiment.started_at,
                exploration_champion=explore[0], exploration_challenger=explore[1],
                rerank_champion=reranks[0], rerank_challenger=reranks[1],
            ))
        return experiment

    def stop(self, experiment_id: str | None = None, now: datetime | None = None) -> OnlineExperiment:
        """Stop the running experiment (serving then returns to the champion for every user).

        Args:
            experiment_id: the experiment to stop (default the running one); it must be running.
            now: the stop time (default now, UTC).
        Returns:
            The experiment, now ``stopped``.
        Raises:
            NoRunningExperiment: no id given and none is running.
            UnknownExperiment: no experiment has ``experiment_id``.
            ExperimentConflict: ``experiment_id`` is not running (already stopped or concluded).
        """
        t = self.table
        with self._locked() as conn:
            row = self._target(conn, experiment_id)
            if row.status != RUNNING:
                raise ExperimentConflict(f"online experiment {row.experiment_id} is {row.status}, not running")
            conn.execute(update(t).where(t.c.experiment_id == row.experiment_id)
                         .values(status=STOPPED, stopped_at=_now(now)))
            return _experiment(conn.execute(select(t).where(t.c.experiment_id == row.experiment_id)).one())

    def conclude(self, experiment_id: str, result: Mapping[str, Any], now: datetime | None = None
                 ) -> OnlineExperiment:
        """Mark an experiment concluded and store its result (the report, as JSON).

        A running experiment is stopped at the same time (``stopped_at`` = ``concluded_at``).

        Args:
            experiment_id: a running or stopped experiment.
            result: a JSON-serialisable mapping (non-finite floats are stored as null; tuples as lists).
            now: the conclusion time (default now, UTC).
        Returns:
            The experiment, now ``concluded``, with ``result`` as read back.
        Raises:
            UnknownExperiment: no experiment has ``experiment_id``.
            ExperimentConflict: it is concluded already.
            TypeError: ``result`` holds something JSON cannot represent.
        """
        payload = json.dumps(jsonable(dict(result)), allow_nan=False, sort_keys=True)
        t = self.table
        when = _now(now)
        with self._locked() as conn:
            row = self._target(conn, experiment_id)
            if row.status == CONCLUDED:
                raise ExperimentConflict(f"online experiment {row.experiment_id} is concluded already")
            values: dict[str, Any] = {"status": CONCLUDED, "concluded_at": when, "result": payload}
            if row.stopped_at is None:
                values["stopped_at"] = when
            conn.execute(update(t).where(t.c.experiment_id == row.experiment_id).values(**values))
            return _experiment(conn.execute(select(t).where(t.c.experiment_id == row.experiment_id)).one())

    # ---- reads ---------------------------------------------------------------------------------------
    def active(self) -> OnlineExperiment | None:
        """The running experiment, or None. One read on the status index; takes no write lock."""
        t = self.table
        with self._read() as conn:
            row = conn.execute(
                select(t).where(t.c.status == RUNNING).order_by(t.c.started_at.desc()).limit(1)
            ).first()
        return None if row is None else _experiment(row)

    def get(self, experiment_id: str) -> OnlineExperiment | None:
        """The experiment with ``experiment_id``, or None."""
        t = self.table
        with self._read() as conn:
            row = conn.execute(select(t).where(t.c.experiment_id == experiment_id)).first()
        return None if row is None else _experiment(row)

    def latest(self) -> OnlineExperiment | None:
        """The most recently started experiment (any status), or None when there has been none."""
        found = self.list(limit=1)
        return found[0] if found else None

    def list(self, limit: int = 20) -> builtins.list[OnlineExperiment]:
        """The experiments, most recently started first (at most ``limit``)."""
        t = self.table
        with self._read() as conn:
            rows = conn.execute(
                select(t).order_by(t.c.started_at.desc(), t.c.experiment_id.desc()).limit(max(0, int(limit)))
            ).all()
        return [_experiment(r) for r in rows]

    # ---- helpers -------------------------------------------------------------------------------------
    def _target(self, conn: Connection, experiment_id: str | None) -> Row:
        t = self.table
        if experiment_id is None:
            row = conn.execute(
                select(t).where(t.c.status == RUNNING).order_by(t.c.started_at.desc()).limit(1)
            ).first()
            if row is None:
                raise NoRunningExperiment("no online experiment is running")
            return row
        row = conn.execute(select(t).where(t.c.experiment_id == experiment_id)).first()
        if row is None:
            raise UnknownExperiment(f"no online experiment {experiment_id!r}")
        return row

    def _locked(self) -> Any:
        """A write transaction under the experiments' lock (the caller uses it as a context manager)."""
        return _LockedTransaction(self.engine, _lock_key(self.names.experiments))

    def _read(self) -> Connection:
        conn = self.engine.connect()
        return conn.execution_options(sqlite_begin="BEGIN") if self.engine.dialect.name == "sqlite" else conn


class _LockedTransaction:
    """``with``: a connection in a transaction holding the experiments' lock; commits on success.

    PostgreSQL: ``pg_advisory_xact_lock`` (released at commit/rollback); SQLite: the engine begins
    with ``BEGIN IMMEDIATE`` (``recloop.logdb.make_engine``), the database write lock.
    """

    def __init__(self, engine: Engine, key: int) -> None:
        self.engine, self.key = engine, key

    def __enter__(self) -> Connection:
        self._conn = self.engine.connect()
        conn = self._conn.execution_options(sqlite_begin="BEGIN IMMEDIATE") if self.engine.dialect.name == "sqlite" \
            else self._conn
        self._tx = conn.begin()
        if self.engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": self.key})
        return conn

    def __exit__(self, exc_type: Any, *_rest: object) -> None:
        try:
            if exc_type is None:
                self._tx.commit()
            else:
                self._tx.rollback()
        finally:
            self._conn.close()


def _lock_key(table: str) -> int:
    """A signed 64-bit advisory-lock key for the experiments table ``table``."""
    digest = hashlib.sha1(f"recloop.experiments\x1f{table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _experiment(row: Row) -> OnlineExperiment:
    m = row._mapping
    return OnlineExperiment(
        experiment_id=m["experiment_id"], mode=m["mode"], champion_version=m["champion_version"],
        challenger_version=m["challenger_version"], weights=(float(m["weight_champion"]),
                                                             float(m["weight_challenger"])),
        salt=m["salt"], status=m["status"], started_at=m["started_at"], stopped_at=m["stopped_at"],
        concluded_at=m["concluded_at"], result=None if m["result"] is None else json.loads(m["result"]),
        exploration=(m["exploration_champion"], m["exploration_challenger"]),
        rerank=(m["rerank_champion"], m["rerank_challenger"]),
    )


def _weights(weights: Any) -> tuple[float, float]:
    try:
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError) as err:
        raise ValueError(f"weights={weights!r}; expected two positive finite numbers") from err
    if len(w) != 2 or not all(0 < x < math.inf for x in w):
        raise ValueError(f"weights={weights!r}; expected two positive finite numbers")
    return w[0], w[1]


#: The exploration policy names (``models.exploration.POLICIES``; checked here when no parser is given).
_EXPLORATION_NAMES = ("greedy", "epsilon", "plackett_luce")


def _exploration_pair(value: Any, parse: Callable[[str], object] | None = None) -> tuple[str | None, str | None]:
    """(champion, challenger) exploration texts, stripped ("" → None), each checked (``ExperimentStore.start``)."""
    if value is None:
        return None, None
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"exploration={value!r}; expected (champion, challenger) policy texts or None")
    return _exploration("champion", pair[0], parse), _exploration("challenger", pair[1], parse)


def _exploration(arm: str, value: Any, parse: Callable[[str], object] | None) -> str | None:
    text = None if value is None else str(value).strip()
    if not text:
        return None
    if len(text) > EXPLORATION_CHARS or not text.isprintable():
        raise ValueError(f"exploration of the {arm}: {value!r}; expected 1..{EXPLORATION_CHARS} printable characters")
    if parse is not None:
        try:
            parse(text)
        except ValueError as err:
            raise ValueError(f"exploration of the {arm}: {err}") from err
    elif text.split(":", 1)[0].strip().lower() not in _EXPLORATION_NAMES:
        raise ValueError(f"exploration of the {arm}: {text!r}; expected greedy | epsilon:EPS | "
                         "plackett_luce:tau=T,n=N")
    return text


#: The re-ranking methods an arm may use (``models.rerank.RERANKERS``; the kernel does not import ``models/``).
RERANK_METHODS: tuple[str, ...] = ("mmr", "dpp")


def parse_rerank(text: str) -> tuple[str, float]:
    """An arm's re-ranking text → (method, diversity).

    Grammar: ``METHOD:DIVERSITY`` with METHOD one of ``RERANK_METHODS`` and DIVERSITY a number in [0, 1]
    (MMR's λ; DPP's θ = 1 - diversity, as a request's ``diversity``; ``models.rerank``), e.g. "mmr:0.3".

    Raises:
        ValueError: another method, a missing or non-numeric diversity, or one outside [0, 1].
    """
    method, sep, value = str(text).strip().partition(":")
    method = method.strip().lower()
    if method not in RERANK_METHODS or not sep:
        raise ValueError(f"rerank={text!r}; expected METHOD:DIVERSITY with METHOD one of {list(RERANK_METHODS)}, "
                         "e.g. mmr:0.3")
    try:
        diversity = float(value)
    except ValueError as err:
        raise ValueError(f"rerank={text!r}: the diversity {value!r} is not a number") from err
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"rerank={text!r}: the diversity must lie in [0, 1]")
    return method, diversity


def _rerank_pair(value: Any) -> tuple[str | None, str | None]:
    """(champion, challenger) re-ranking texts, normalised ("MMR: 0.30" → "mmr:0.3"; "" → None)."""
    if value is None:
        return None, None
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"rerank={value!r}; expected (champion, challenger) re-ranking texts or None")
    out: list[str | None] = []
    for arm, given in zip(ARMS, pair, strict=True):
        raw = None if given is None else str(given).strip()
        if not raw:
            out.append(None)
            continue
        if len(raw) > RERANK_CHARS or not raw.isprintable():
            raise ValueError(f"rerank of the {arm}: {given!r}; expected 1..{RERANK_CHARS} printable characters")
        try:
            method, diversity = parse_rerank(raw)
        except ValueError as err:
            raise ValueError(f"rerank of the {arm}: {err}") from err
        out.append(f"{method}:{diversity:g}")
    return out[0], out[1]


def _version(name: str, value: Any) -> str:
    out = "" if value is None else str(value).strip()
    if not out or len(out) > MODEL_VERSION_CHARS or not out.isprintable():
        raise ValueError(f"{name}={value!r}; expected 1..{MODEL_VERSION_CHARS} printable characters")
    return out


def _now(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _parse_time(value: Any) -> Any:
    if value is None:
        return None
    return _now(value if isinstance(value, datetime) else datetime.fromisoformat(str(value)))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (``json.dumps(..., allow_nan=False)`` accepts it): mapping keys → str,
    tuples, sets and numpy arrays → lists, numpy scalars → Python numbers, non-finite floats → None,
    datetimes (and pandas Timestamps) → ISO strings; anything else → ``str(value)``. Used for every
    report the experiment and simulation code stores or prints."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars (a scalar's tolist is a Python number)
    if callable(tolist):
        return jsonable(tolist())
    return str(value)
