"""The ``evaluate`` flow: test metrics of candidate, baselines and champion; the gate; the registry.

The candidate's run says which data it trained on (``data.source``/``data.path``); the events are
re-read, checked against the run's fingerprint, and split exactly as in training (leave-one-out
with the candidate's own vocabulary). Every model is ranked over the full catalogue on that one
test split. The champion may know fewer items: its inputs and scores are mapped by item id
(``models.ranking.MappedScorer``), items it does not know get ``-inf``.

Outputs: test metrics on the run (``test.<metric>``, ``test.<model>.<metric>``), the report
(JSON + markdown) and plots as artifacts, the gate decision and its numbers as tags on the run and on
the new model version, and a Prefect markdown artifact with key ``evaluation-report``.

After the offline gate, off-policy estimates of the candidate's and the champion's online CTR on the
exposure log (``flows/ope.py``: SNIPS, DR, IIPS, PI) go into the report and on the run as ``ope.*``
metrics, and their rule is ANDed into the decision when it ran; a skipped rule (too few exploratory
requests, small ESS, unsupported mass, no log) changes nothing and says why (tag ``gate.ope``).

Automatic promotion pauses while an online experiment runs (``auto_promotion_blocked``): a passing
candidate is registered and becomes ``challenger``, but the served alias stays, and the run and the
version are tagged ``promotion.skipped``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import prefect  # noqa: F401  (before mlflow: keeps Prefect's console log format)
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.ope import apply_ope_gate, ope_markdown, ope_metrics, ope_tag, ope_task
from flows.train import data_fingerprint, load_events, mlflow_key
from models.baselines import BASELINES, baselines_for
from models.metrics import evaluate, rank_in_chunks
from models.ranking import MappedScorer
from models.sequences import EvalSet, Split, build_sequences, leave_one_out
from models.short_history import choose_short_history
from models.tradeoff import EVAL_GRID, tradeoff_study
from models.vocab import ItemVocabulary
from recloop.experiments import ExperimentStore
from recloop.gate import GateDecision, decide
from recloop.settings import Settings, get_settings
from registry import aliases, plots, store, tracking

REPORT_KEYS = ("ndcg@10", "hr@10", "recall@10", "mrr@10", "coverage@10", "novelty@10", "mean_pop@10",
               "ild@10", "freshness@10")


def item_counts(train: dict[str, np.ndarray], n_items: int) -> np.ndarray:
    """(n_items + 1,) training interaction counts per item_idx."""
    seqs = [s for s in train.values() if len(s)]
    flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=n_items + 1)


def evaluate_all(split: Split, n_items: int, candidate: Any, champion: Any | None = None,
                 genres: list[list[str]] | None = None, baselines: Sequence[str] = BASELINES,
                 fresh: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Full-ranking test metrics (K = 10, seen excluded) per model: candidate, champion, baselines.

    Args:
        split: the leave-one-out split; baselines are fitted on ``split.train``.
        n_items: catalogue size (padding excluded).
        candidate / champion: scorers in the split's index space (champion may be None).
        genres: item_idx -> genres, enables intra-list diversity.
        fresh: (n_items + 1,) bool items added in the last ``settings.freshness_days`` (``fresh_by_idx``),
            enables freshness@10.
        baselines: names from ``BASELINES`` (EASE and ItemKNN are dense n_items^2: drop them for
            catalogues beyond ~30k items).
    Returns:
        model name -> metric name (``ndcg@10``, ``hr@10``, ``coverage@10``, ...) -> mean value.
    Raises:
        ValueError: an unknown baseline name (lists the allowed ones).
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; expected a subset of {list(BASELINES)}")
    counts = item_counts(split.train, n_items)
    scorers: dict[str, Any] = {"candidate": candidate}
    if champion is not None:
        scorers["champion"] = champion
    for name in baselines:
        scorers[name] = BASELINES[name]().fit(split.train, n_items)
    return {
        name: evaluate(scorer, split.test, n_items=n_items, k=10, item_counts=counts,
                       n_train_users=len(split.train), item_genres=genres, fresh=fresh)["metrics"]
        for name, scorer in scorers.items()
    }


def sample_split(split: Split, n: int, seed: int, turn: str) -> Split:
    """``split`` with validation and test restricted to ``n`` test users drawn by ``recloop.loop_sample.eval_sample``
    (seeded by ``seed`` and ``turn``); the training sequences (the baselines' fit) stay. Recorded in the protocol.

    Raises:
        ValueError: ``n`` < 1.
    """
    from recloop.loop_sample import eval_sample

    users = set(split.test.user_ids[eval_sample(split.test.user_ids, n, seed, turn)].tolist())

    def pick(part: EvalSet) -> EvalSet:
        keep = np.array([i for i, u in enumerate(part.user_ids) if u in users], dtype=np.int64)
        return EvalSet(part.user_ids[keep], [part.histories[i] for i in keep], part.targets[keep])

    protocol = {**split.protocol, "eval_users": len(users), "eval_sample": f"seeded uniform (seed={seed}, turn={turn})"}
    return Split(split.train, pick(split.valid), pick(split.test), protocol, split.vocab)


def markdown_table(results: dict[str, dict[str, float]], decision: GateDecision | None = None) -> str:
    """The evaluation report as a markdown table (rows: models; columns: REPORT_KEYS)."""
    keys = [k for k in REPORT_KEYS if any(k in m for m in results.values())]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, metrics in results.items():
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if decision is not None:
        lines += ["", f"**Gate: {'PASS' if decision.passed else 'FAIL'}**", ""]
        lines += [f"- {r}" for r in decision.reasons]
    return "\n".join(lines) + "\n"


def top10_lists(model: Any, test: EvalSet, n_items: int) -> np.ndarray:
    """(n_users, 10) item_idx recommended to each test user, seen items excluded."""
    return rank_in_chunks(model, test, n_items=n_items, k=10)[1]  # chunked: bounded memory


def auto_promotion_blocked(settings: Settings) -> str | None:
    """Why automatic promotion must not move the served alias now, or None when it may.

    It may not while an online experiment runs (its champion must stay the version it started with);
    nor when the experiments table cannot be read (fail closed: the alias stays).
    """
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with ExperimentStore(settings.event_log_uri) as experiments:
            running = experiments.active()
    except SQLAlchemyError as err:
        return f"online experiments unreadable ({type(err).__name__}: {str(err)[:200]})"
    return None if running is None else f"online experiment {running.experiment_id} running"


def promote_unless_blocked(client: MlflowClient, settings: Settings, run_id: str, version: str, logger: Any) -> bool:
    """Point the served alias at ``version`` (gate passed) unless ``auto_promotion_blocked`` says why not.

    Returns:
        True when promoted; False when blocked: the run and the version are then tagged
        ``promotion.skipped=<reason>`` and the alias stays.
    """
    blocked = auto_promotion_blocked(settings)
    if blocked is None:
        aliases.promote(client, settings.model_name, version, alias=settings.model_alias, reason="auto: gate passed")
        return True
    client.set_tag(run_id, "promotion.skipped", blocked)
    client.set_model_version_tag(settings.model_name, version, "promotion.skipped", blocked)
    logger.info("auto-promotion of version %s skipped: %s", version, blocked)
    return False


@task(cache_policy=NO_CACHE)
def score_models_task(split: Split, vocab: ItemVocabulary, candidate: Any, champion: Any | None,
                      genres: list[list[str]] | None, baselines: Sequence[str], fresh: np.ndarray | None = None
                      ) -> dict[str, dict[str, float]]:
    """Evaluate every model on the test split (fails loudly)."""
    champ = MappedScorer(champion.model, champion.vocab, vocab) if champion is not None else None
    return evaluate_all(split, len(vocab), candidate, champ, genres, baselines, fresh)


def fresh_by_idx(events: Any, items: Any, vocab: ItemVocabulary, days: float) -> np.ndarray:
    """(n_items + 1,) bool: items added to the catalogue in the last ``days`` days before the events' newest
    timestamp (not today). Added = the item table's ``created_at`` when known, else the item's first event."""
    import pandas as pd

    from models.metrics import fresh_items
    from recloop.features import item_added_at

    added = item_added_at(events, items)
    secs = np.full(len(vocab) + 1, np.nan)
    known = [i for i in added.index if i in vocab]
    secs[vocab.encode(known)] = [added[i].timestamp() for i in known]
    ts = pd.to_datetime(events["timestamp"], utc=True)
    return fresh_items(secs, ts.max().timestamp(), days)


def _genres(items: Any, vocab: ItemVocabulary) -> list[list[str]] | None:
    if items is None or len(items) == 0 or "genres" not in items:
        return None
    by_id = dict(zip(items["item_id"].astype(str), items["genres"], strict=True))
    return [[]] + [list(by_id.get(i, []) or []) for i in vocab.ids]


def short_history_tags(short: dict[str, Any]) -> dict[str, str]:
    """The run's and the version's tags of the short-history choice (``models.short_history``): serving
    answers users with 1-2 known items with the blend when ``short_history.strategy`` is
    "short_history_blend", at weight ``short_history.weight``; absent tags: the model (the default)."""
    tags = {"short_history.strategy": str(short["strategy"])}
    if short.get("weight") is not None:
        tags["short_history.weight"] = f"{float(short['weight']):g}"
    return tags


def short_history_markdown(short: dict[str, Any]) -> str:
    """The report's short-history section: NDCG@10 of the model and of each blend weight, and the choice."""
    ndcg = short.get("ndcg@10") or {}
    lines = ["", f"**Short histories (1-2 events): {short['strategy']}** on {short['population']}",
             "(blend = w · item-kNN neighbours + (1 − w) · popularity; w = 0 is popularity alone)", ""]
    if ndcg:
        lines.append(f"- model NDCG@10 {ndcg['model']:.4f}")
        lines += [f"- blend w={w:g} NDCG@10 {v:.4f}" for w, v in ndcg["blend"].items()]
    return "\n".join(lines) + "\n"


def rerank_tradeoff(model: Any, split: Split, n_items: int, genres: Any, fresh: np.ndarray | None,
                    settings: Settings) -> dict[str, Any] | None:
    """The diversity re-rankers' trade-off curves on validation, the default diversity chosen there and test
    once at it (``models.tradeoff.tradeoff_study`` on ``settings.rerank_eval_users`` sampled users of each
    split, seeded by ``settings.seed``, grid ``EVAL_GRID``); None when ``rerank_eval_users`` is 0, a split has no
    users, or the model has no item embeddings (the re-rankers' similarity)."""
    valid, test = getattr(split, "valid", None), getattr(split, "test", None)
    if settings.rerank_eval_users <= 0 or not valid or not test or not hasattr(model, "item_embeddings"):
        return None
    return tradeoff_study(model, split.valid, split.test, n_items, genres=genres, fresh=fresh, grid=EVAL_GRID,
                          max_users=settings.rerank_eval_users, seed=settings.seed)


def rerank_tags(rerank: dict[str, Any] | None) -> dict[str, str]:
    """The run's and the version's tags: the default diversity of each re-ranker chosen on validation."""
    if rerank is None:
        return {}
    return {f"rerank.default_diversity.{m}": f"{d:g}" for m, d in rerank["default_diversity"].items()}


def rerank_markdown(rerank: dict[str, Any] | None) -> str:
    """The report's re-ranking section: the validation curves as a table, the defaults, test once at them."""
    if rerank is None:
        return ""
    p = rerank["protocol"]
    lines = ["", f"**Diversity re-ranking** (top {p['n_candidates']} re-ranked; {p['valid_users']} validation users; "
             f"default = the largest diversity within {p['max_ndcg_drop']:.0%} of the model's NDCG@10)", "",
             "| re-ranker | diversity | NDCG@10 | ILD@10 genres | ILD@10 embeddings | coverage@10 |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, curve in rerank["valid_curves"].items():
        for pt in curve:
            genre = "-" if pt["ild_genre@10"] is None else f"{pt['ild_genre@10']:.4f}"
            lines.append(f"| {method} | {pt['diversity']:g} | {pt['ndcg@10']:.4f} | {genre} | "
                         f"{pt['ild_emb@10']:.4f} | {pt['coverage@10']:.4f} |")
    lines.append("")
    for method, d in rerank["default_diversity"].items():
        test = rerank["test_once"][method][f"diversity={d:g}"]
        lines.append(f"- {method}: default diversity {d:g}; test NDCG@10 {test['ndcg@10']:.4f}, ILD@10 (embeddings) "
                     f"{test['ild_emb@10']:.4f}")
    return "\n".join(lines) + "\n"


def _log_rerank(client: MlflowClient, run_id: str, rerank: dict[str, Any] | None) -> None:
    """The trade-off as a table (``evaluation/rerank_tradeoff.json``), a plot and validation metrics on the run."""
    if rerank is None:
        return
    for method, curve in rerank["valid_curves"].items():
        for pt in curve:
            for key in ("ndcg@10", "ild_emb@10", "ild_genre@10"):
                if pt[key] is not None:
                    client.log_metric(run_id, f"rerank.{method}.d{pt['diversity']:g}.{mlflow_key(key)}", pt[key])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "rerank_tradeoff.json").write_text(json.dumps(rerank, indent=2, default=float))
        client.log_artifact(run_id, str(out / "rerank_tradeoff.json"), artifact_path="evaluation")
        plots.rerank_tradeoff(rerank["valid_curves"], out / "rerank_tradeoff.png", rerank["default_diversity"])
        client.log_artifact(run_id, str(out / "rerank_tradeoff.png"), artifact_path="plots")


def _load_candidate(client: MlflowClient, run_id: str) -> tuple[Any, ItemVocabulary, dict[str, Any]]:
    from models.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(client.download_artifacts(run_id, "training/checkpoint.pt", tmp))


@flow(name="evaluate")
def evaluate_flow(run_id: str, source: str | None = None, path: str | None = None,
                  auto_promote: bool | None = None, baselines: list[str] | None = None,
                  eval_users: int | None = None, eval_turn: str = "") -> dict[str, Any]:
    """Evaluate the candidate of ``run_id``, apply the gate, register a version and move aliases.

    Args:
        run_id: the train flow's run.
        source / path: override the data location recorded on the run (same events required).
        auto_promote: default ``settings.auto_promote``; when True a passing candidate becomes champion.
        baselines: which baselines to run and gate against (default: all of ``BASELINES``).
        eval_users / eval_turn: evaluate every model on a seeded sample of this many test users (``sample_split``;
            an incremental loop turn passes ``settings.loop_eval_users`` and its batch id); None = all.
    Returns:
        ``{"run_id", "version", "passed", "promoted", "decision", "metrics", "report_md", "ope", "rerank"}``
        (``ope``: ``flows.ope.ope_task``'s result; ``rerank``: ``rerank_tradeoff``'s, None when skipped).
    Raises:
        ValueError: the events differ from the ones the candidate was trained on.
    """
    settings = get_settings()
    logger = get_run_logger()
    baselines = list(BASELINES) if baselines is None else baselines
    client = tracking.configure_tracking(settings)
    run = client.get_run(run_id)
    source = source or run.data.tags["data.source"]
    path = path or run.data.tags.get("data.path") or None
    events, items, _ = load_events(source, path)
    sha = data_fingerprint(events, source)["data.sha256"]
    if sha != run.data.tags.get("data.sha256"):
        raise ValueError(f"events of source={source!r} path={path!r} have sha256 {sha[:12]}, but run "
                         f"{run_id} trained on {run.data.tags.get('data.sha256', '?')[:12]}")
    model, vocab, _ = _load_candidate(client, run_id)
    policy = settings.event_policy  # the candidate's targets are positives only, as in training
    split = leave_one_out(build_sequences(policy.positives(events), vocab))
    split.protocol["event_policy"] = policy.describe()
    if eval_users:  # an incremental loop turn: a fixed-size sample, the same for every model scored
        split = sample_split(split, eval_users, settings.seed, eval_turn)
    champion_version = aliases.get_alias_version(client, settings.model_name, settings.model_alias)
    champion = (store.load_version(settings.model_name, version=champion_version, client=client)
                if champion_version is not None else None)

    fresh = fresh_by_idx(events, items, vocab, settings.freshness_days)
    baselines, skipped_baselines = baselines_for(len(vocab), list(baselines))  # dense ones skipped when large
    results = score_models_task(split, vocab, model, champion, _genres(items, vocab), list(baselines), fresh)
    baselines = {n: m for n, m in results.items() if n not in ("candidate", "champion")}
    decision = decide(results["candidate"], results.get("champion"), baselines,
                      min_gain=settings.gate_min_gain, max_coverage_drop=settings.gate_max_coverage_drop)
    ope = ope_task(settings, model, vocab, champion)
    decision = apply_ope_gate(decision, ope["gate"])
    short = choose_short_history(model, split.valid, split.train, len(vocab))  # serving reads the version tags
    rerank = rerank_tradeoff(model, split, len(vocab), _genres(items, vocab), fresh, settings)
    gate_tags = {**decision.as_tags(), "gate.champion_version": champion_version or "none",
                 "gate.ope": ope_tag(ope["gate"]), **short_history_tags(short),
                 **rerank_tags(rerank)}
    for name, metrics in results.items():
        prefix = "test." if name == "candidate" else f"test.{name}."
        for key, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, prefix + mlflow_key(key), value)
    for key, value in ope_metrics(ope).items():
        client.log_metric(run_id, key, value)
    for key, value in gate_tags.items():
        client.set_tag(run_id, key, value)

    report_md = (markdown_table(results, decision) + ope_markdown(ope) + short_history_markdown(short)
                 + rerank_markdown(rerank))
    if skipped_baselines:
        report_md += "\n**Baselines skipped**\n\n" + "".join(f"- {n}: {why}\n" for n, why in skipped_baselines.items())
        client.set_tag(run_id, "baselines.skipped", ",".join(skipped_baselines))
    _log_report(client, run_id, results, decision, report_md, model, split, vocab, champion_version, ope, short)
    _log_rerank(client, run_id, rerank)
    create_markdown_artifact(key="evaluation-report", markdown=report_md,
                             description=f"candidate run {run_id}")

    model_uri = run.data.tags["model.uri"]
    version_tags = {**gate_tags, "run_id": run_id, "data.sha256": sha,
                    **{f"test.{mlflow_key(k)}": f"{v:.6f}" for k, v in results["candidate"].items()}}
    mv = aliases.register_version(client, settings.model_name, model_uri, run_id, version_tags)
    promoted = False
    if decision.passed:
        aliases.set_challenger(client, settings.model_name, mv.version)
        if settings.auto_promote if auto_promote is None else bool(auto_promote):
            promoted = promote_unless_blocked(client, settings, run_id, str(mv.version), logger)
    stage = "promoted" if promoted else ("challenger" if decision.passed else "rejected")
    client.set_tag(run_id, "stage", stage)
    client.set_tag(run_id, "model.version", str(mv.version))
    logger.info("evaluated run_id=%s version=%s passed=%s promoted=%s", run_id, mv.version, decision.passed,
                promoted)
    return {"run_id": run_id, "version": str(mv.version), "passed": decision.passed, "promoted": promoted,
            "decision": decision.as_dict(), "metrics": results, "report_md": report_md, "ope": ope,
            "rerank": rerank}


def _log_report(client: MlflowClient, run_id: str, results: dict[str, dict[str, float]],
                decision: GateDecision, report_md: str, model: Any, split: Split, vocab: ItemVocabulary,
                champion_version: str | None, ope: dict[str, Any] | None = None,
                short_history: dict[str, Any] | None = None) -> None:
    """Report JSON + markdown and the comparison / popularity plots as run artifacts."""
    n_items = len(vocab)
    report = {"protocol": {**split.protocol, "ranking": "full", "k": 10, "exclude_seen": True,
                           "split_of": "test"},
              "metrics": results, "gate": decision.as_dict(), "champion_version": champion_version, "ope": ope,
              "short_history": short_history}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "evaluation.json").write_text(json.dumps(report, indent=2, default=float))
        (out / "evaluation.md").write_text(report_md)
        client.log_artifact(run_id, str(out / "evaluation.json"), artifact_path="evaluation")
        client.log_artifact(run_id, str(out / "evaluation.md"), artifact_path="evaluation")
        shown = {n: m for n, m in results.items() if n in ("candidate", "champion")}
        shown.update({n: m for n, m in results.items() if n not in shown})
        plots.model_comparison(shown, out / "model_comparison.png")
        plots.popularity_distribution(item_counts(split.train, n_items),
                                      top10_lists(model, split.test, n_items), out / "popularity.png")
        client.log_artifact(run_id, str(out / "model_comparison.png"), artifact_path="plots")
        client.log_artifact(run_id, str(out / "popularity.png"), artifact_path="plots")
