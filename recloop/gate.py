"""The evaluation gate: may a candidate model replace the champion? Pure, no I/O.

Rules (all on the same test split, full ranking, K = 10):

1. ``candidate NDCG@10 >= champion NDCG@10 * (1 + min_gain)``  (skipped when there is no champion);
2. ``candidate NDCG@10 >= max(baseline NDCG@10)``               (skipped when no baseline was run);
3. ``candidate coverage@10 >= champion coverage@10 * (1 - max_coverage_drop)`` (skipped without champion).

The candidate passes only if every applicable rule holds. A missing or non-finite candidate metric is
a failure, never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

NDCG_KEY = "ndcg@10"
EPS = 1e-12  # float rounding tolerance: a candidate exactly at a threshold passes
COVERAGE_KEY = "coverage@10"


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict with every number it used.

    Attributes:
        passed: True when every applicable rule holds.
        reasons: one human-readable line per rule, prefixed ``PASS`` or ``FAIL``.
        candidate_ndcg / candidate_coverage: the candidate's NDCG@10 and coverage@10.
        champion_ndcg / champion_coverage: the champion's, or None without a champion.
        best_baseline / best_baseline_ndcg: name and NDCG@10 of the strongest baseline, or None.
        required_ndcg: the NDCG@10 the candidate had to reach (max of rules 1 and 2), 0 if none.
        required_coverage: the coverage@10 the candidate had to reach, 0 if no champion.
        min_gain / max_coverage_drop: the thresholds applied.
    """

    passed: bool
    reasons: list[str]
    candidate_ndcg: float
    candidate_coverage: float
    champion_ndcg: float | None
    champion_coverage: float | None
    best_baseline: str | None
    best_baseline_ndcg: float | None
    required_ndcg: float
    required_coverage: float
    min_gain: float
    max_coverage_drop: float
    baseline_ndcg: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict of the decision."""
        return asdict(self)

    def as_tags(self, prefix: str = "gate.") -> dict[str, str]:
        """Flat string tags for an MLflow run or model version (None becomes ``"none"``).

        Keys avoid ``@`` (MLflow names allow only alphanumerics, ``_-. /:``).
        """
        tags: dict[str, str] = {f"{prefix}decision": "pass" if self.passed else "fail"}
        for key, value in asdict(self).items():
            if key in ("passed", "baseline_ndcg"):
                continue
            if key == "reasons":
                tags[f"{prefix}reasons"] = " | ".join(self.reasons)[:4900]
            elif isinstance(value, float):
                tags[f"{prefix}{key}"] = f"{value:.6f}"
            else:
                tags[f"{prefix}{key}"] = "none" if value is None else str(value)
        for name, value in self.baseline_ndcg.items():
            tags[f"{prefix}baseline.{name}.ndcg_at_10"] = f"{value:.6f}"
        return tags


def _metric(metrics: Mapping[str, float], key: str, who: str) -> float:
    if key not in metrics:
        raise KeyError(f"{who} metrics lack {key!r}; got {sorted(metrics)}")
    return float(metrics[key])


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


#: The gate's thresholds (``RECLOOP_GATE_MIN_GAIN`` / ``RECLOOP_GATE_MAX_COVERAGE_DROP`` override them).
DEFAULT_MIN_GAIN = 0.0
DEFAULT_MAX_COVERAGE_DROP = 0.2


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    baselines: Mapping[str, Mapping[str, float]],
    *,
    min_gain: float = DEFAULT_MIN_GAIN,
    max_coverage_drop: float = DEFAULT_MAX_COVERAGE_DROP,
) -> GateDecision:
    """Decide whether ``candidate`` may become the champion.

    Args:
        candidate: the candidate's test metrics; must hold ``ndcg@10`` and ``coverage@10``.
        champion: the current champion's metrics on the same split, or None when there is none.
        baselines: baseline name -> metrics (each must hold ``ndcg@10``); may be empty.
        min_gain: relative NDCG@10 gain required over the champion (0.0 = at least equal; may be
            negative to tolerate a small loss).
        max_coverage_drop: allowed relative drop of coverage@10 versus the champion, in [0, 1].

    Returns:
        The GateDecision with reasons and all numbers.

    Raises:
        KeyError: a required metric is missing (names the model and the metrics present).
        ValueError: ``max_coverage_drop`` outside [0, 1] or ``min_gain`` <= -1.
    """
    if not 0.0 <= max_coverage_drop <= 1.0:
        raise ValueError(f"max_coverage_drop={max_coverage_drop} must be in [0, 1]")
    if min_gain <= -1.0:
        raise ValueError(f"min_gain={min_gain} must be > -1")
    cand_ndcg = _metric(candidate, NDCG_KEY, "candidate")
    cand_cov = _metric(candidate, COVERAGE_KEY, "candidate")
    reasons: list[str] = []
    passed = True
    if not (_finite(cand_ndcg) and _finite(cand_cov)):
        passed = False
        reasons.append(f"FAIL candidate metrics not finite: ndcg@10={cand_ndcg} coverage@10={cand_cov}")

    baseline_ndcg = {name: _metric(m, NDCG_KEY, f"baseline {name}") for name, m in baselines.items()}
    required_ndcg, required_cov = 0.0, 0.0
    champ_ndcg = champ_cov = None
    if champion is not None:
        champ_ndcg = _metric(champion, NDCG_KEY, "champion")
        champ_cov = _metric(champion, COVERAGE_KEY, "champion")
        need = champ_ndcg * (1.0 + min_gain)
        required_ndcg = max(required_ndcg, need)
        ok = cand_ndcg >= need - EPS
        passed &= ok
        reasons.append(
            f"{'PASS' if ok else 'FAIL'} ndcg@10 {cand_ndcg:.4f} vs champion {champ_ndcg:.4f} "
            f"x (1 + {min_gain:g}) = {need:.4f}"
        )
        required_cov = champ_cov * (1.0 - max_coverage_drop)
        ok = cand_cov >= required_cov - EPS
        passed &= ok
        reasons.append(
            f"{'PASS' if ok else 'FAIL'} coverage@10 {cand_cov:.4f} vs champion {champ_cov:.4f} "
            f"x (1 - {max_coverage_drop:g}) = {required_cov:.4f}"
        )
    else:
        reasons.append("PASS no champion yet: champion rules skipped")

    best_name = max(baseline_ndcg, key=baseline_ndcg.__getitem__) if baseline_ndcg else None
    best_ndcg = baseline_ndcg[best_name] if best_name is not None else None
    if best_name is not None and best_ndcg is not None:
        required_ndcg = max(required_ndcg, best_ndcg)
        ok = cand_ndcg >= best_ndcg - EPS
        passed &= ok
        reasons.append(
            f"{'PASS' if ok else 'FAIL'} ndcg@10 {cand_ndcg:.4f} vs best baseline {best_name} {best_ndcg:.4f}"
        )
    else:
        reasons.append("PASS no baselines given: baseline rule skipped")

    return GateDecision(
        passed=bool(passed),
        reasons=reasons,
        candidate_ndcg=cand_ndcg,
        candidate_coverage=cand_cov,
        champion_ndcg=champ_ndcg,
        champion_coverage=champ_cov,
        best_baseline=best_name,
        best_baseline_ndcg=best_ndcg,
        required_ndcg=required_ndcg,
        required_coverage=required_cov,
        min_gain=min_gain,
        max_coverage_drop=max_coverage_drop,
        baseline_ndcg=baseline_ndcg,
    )
