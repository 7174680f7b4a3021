"""The ``recloop`` command line (typer). Each command is a thin wrapper over a flow or a helper."""

from __future__ import annotations

import contextlib
import json
import sys

import httpx
import typer

from cli import DEMO_TRAIN_SECONDS
from recloop import __version__
from recloop.settings import configure_environment

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="recloop: interactive recommendation MLOps."
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON figures.")
model_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry: list, promote, roll back.")
app.add_typer(bench_app, name="bench")
db_app = typer.Typer(no_args_is_help=True, help="The event-log database's schema (Alembic migrations).")
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
online_app = typer.Typer(no_args_is_help=True, help="The online feature store (Feast): re-sync it from its sources.")
app.add_typer(online_app, name="online")
blocklist_app = typer.Typer(no_args_is_help=True, help="The catalogue-wide blocklist every serving worker masks "
                            "(within RECLOOP_BLOCKLIST_TTL_S).")
app.add_typer(blocklist_app, name="blocklist")
experiment_app = typer.Typer(no_args_is_help=True, help="Online experiments: the champion against a challenger "
                             "(A/B test or interleaving); start, status, stop, conclude.")
app.add_typer(experiment_app, name="experiment")


@app.command()
def version() -> None:
    """Print the recloop version."""
    typer.echo(__version__)


@app.command()
def ingest(
    source: str = typer.Option("synthetic", help="Source name (recloop.sources.SOURCES), e.g. movielens-1m"),
    path: str = typer.Option(None, help="File or folder of the data (MovieLens: downloaded when omitted)"),
    batch_id: str = typer.Option(None, help="Batch id (default <UTC time>-<hash>)"),
    seed: int = typer.Option(None, help="Seed of the synthetic source"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table"),
) -> None:
    """Read a source, pass it through the validation gate, append the accepted rows to the lake.

    Bad rows are quarantined under <home>/quarantine/<batch>/; re-ingesting the same rows adds nothing.
    """
    from rich.console import Console
    from rich.table import Table

    from flows.ingest import validated_ingest

    options = {"seed": seed} if seed is not None else {}
    try:
        with _stdout_to_stderr(as_json):
            report = validated_ingest(source, path, batch_id=batch_id, **options)
    except (ValueError, OSError, httpx.HTTPError) as err:  # DataValidationError/SourceError are ValueErrors
        typer.echo(f"ingest failed: {err}", err=True)
        raise typer.Exit(1) from err
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"ingest {source} batch {report['batch_id']}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)


@app.command()
def validate(
    source: str = typer.Option(..., help="Source name (recloop.sources.SOURCES), e.g. movielens-100k"),
    path: str = typer.Option(None, help="File or folder of the data"),
    batch_id: str = typer.Option(None, help="Batch id (default <source>-<UTC time>)"),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
    data_docs: bool = typer.Option(True, help="Build Data Docs under <home>/data_docs"),
) -> None:
    """Read a source, run the validation gate (GX) and print the outcome; exit 1 when the batch stops."""
    import json
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    from flows.validate import read_and_validate, write_outcome
    from recloop.quarantine import DataValidationError
    from recloop.settings import get_settings

    try:
        with _stdout_to_stderr(as_json):
            outcome = read_and_validate(source, path, datetime.now(UTC), batch_id)
    except DataValidationError as err:
        typer.echo(
            json.dumps({"passed": False, "stopped": True, "failing": err.failing}) if as_json else str(err)
        )
        raise typer.Exit(1) from err
    except (ValueError, OSError, httpx.HTTPError) as err:  # unknown source, missing file, failed download
        typer.echo(f"validate failed: {err}", err=True)
        raise typer.Exit(1) from err
    with _stdout_to_stderr(as_json):
        outcome = write_outcome(outcome, get_settings().home, data_docs=data_docs)
    if as_json:
        typer.echo(outcome.model_dump_json(indent=2, exclude={"expectations"}))
    else:
        table = Table(title=f"validation {outcome.batch_id}: {'PASSED' if outcome.passed else 'STOPPED'}")
        table.add_column("field")
        table.add_column("value")
        for key in ("rows_in", "rows_ok", "rows_quarantined", "rows_deduplicated", "bad_share", "duration_s"):
            table.add_row(
                key,
                f"{getattr(outcome, key):.4g}"
                if key.endswith(("_s", "share"))
                else str(getattr(outcome, key)),
            )
        for key, count in outcome.unexpected_counts.items():
            table.add_row(f"unexpected {key}", str(count))
        for item in outcome.failing:
            table.add_row("[red]failing[/red]", item)
        table.add_row("results", str(outcome.results_path))
        table.add_row("data docs", str(outcome.data_docs_path))
        Console().print(table)
    if outcome.stopped:
        raise typer.Exit(1)


@bench_app.command("validate")
def bench_validate(
    source: str = typer.Option("movielens-100k", help="Source name"),
    path: str = typer.Option(..., help="File or folder of the data"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """Time the gate in a fresh process, `import great_expectations` included; prints JSON."""
    import subprocess
    import sys

    code = (
        "import json, time; t0 = time.perf_counter()\n"
        "import great_expectations\n"
        "t_import = time.perf_counter() - t0\n"
        "from datetime import UTC, datetime\n"
        "from flows.validate import read_and_validate\n"
        "t1 = time.perf_counter()\n"
        f"o = read_and_validate({source!r}, {path!r}, datetime.now(UTC))\n"
        "t_all = time.perf_counter() - t0\n"
        "print(json.dumps({'rows_in': o.rows_in, 'passed': o.passed, 'gx_import_s': round(t_import, 2),\n"
        "    'read_and_validate_s': round(time.perf_counter() - t1, 2),\n"
        "    'validate_batch_s': round(o.duration_s, 2),\n"
        "    'total_fresh_process_s': round(t_all, 2)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        typer.echo(result.stderr[-2000:], err=True)
        raise typer.Exit(result.returncode)
    typer.echo(result.stdout.strip().splitlines()[-1])


@bench_app.command("serving")
def bench_serving_cmd(
    path: str = typer.Option("../shared/data/ml-100k", help="The ml-100k folder"),
    home: str = typer.Option("", help="Scratch RECLOOP_HOME (default: a new temp dir)"),
    requests: int = typer.Option(2000, help="Recommends at concurrency 8 (a quarter at concurrency 1)"),
    feedbacks: int = typer.Option(200, help="feedback -> recommend rounds"),
    concurrency: list[int] = typer.Option([1, 8, 32], help="Client threads per cell (repeat the option)"),
    workers: int = typer.Option(0, help="BentoML worker processes (0: RECLOOP_SERVE_WORKERS / the default)"),
    soak_s: float = typer.Option(0.0, help="Then a soak of this many seconds (80/20, c=8) watching the RSS"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """Train a short ml-100k champion, run `bentoml serve`, print latency/throughput JSON."""
    import json
    import tempfile
    from pathlib import Path

    from bench.serving import bench_serving

    scratch = Path(home) if home else Path(tempfile.mkdtemp(prefix="recloop-bench-")) / "home"
    with _stdout_to_stderr():
        out = bench_serving(Path(path).resolve(), scratch.resolve(), n_requests=requests, n_feedback=feedbacks,
                            concurrencies=tuple(concurrency), workers=workers or None, soak_s=soak_s)
    typer.echo(json.dumps(out, indent=2 if not as_json else None))


@db_app.command("upgrade")
def db_upgrade(
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout"),
) -> None:
    """Apply the event-log migrations up to head (idempotent; services also apply them on start)."""
    import json

    from recloop.logdb import HEAD_REVISION, current_revision, make_engine, upgrade
    from recloop.settings import get_settings

    engine = make_engine(get_settings().event_log_uri)
    try:
        before = current_revision(engine)
        after = upgrade(engine)
    finally:
        engine.dispose()
    out = {"before": before, "after": after, "head": HEAD_REVISION}
    typer.echo(json.dumps(out) if as_json else f"event log schema: {before or 'none'} -> {after}")


@db_app.command("current")
def db_current(
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout"),
) -> None:
    """The event-log database's applied revision and the code's head (exit 1 when behind)."""
    import json

    from recloop.logdb import HEAD_REVISION, current_revision, make_engine
    from recloop.settings import get_settings

    engine = make_engine(get_settings().event_log_uri)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    out = {"current": current, "head": HEAD_REVISION, "up_to_date": current == HEAD_REVISION}
    typer.echo(json.dumps(out) if as_json else f"event log schema: {current or 'none'} (head {HEAD_REVISION})")
    if current != HEAD_REVISION:
        raise typer.Exit(1)


@bench_app.command("exposure")
def bench_exposure_cmd(
    path: str = typer.Option("../shared/data/ml-100k", help="The ml-100k folder"),
    reps: int = typer.Option(10, help="Alternating on/off repetitions"),
    block: int = typer.Option(200, help="Recommends per block"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """In-process cost of recording exposures: recommend with the exposure log on vs off (alternating)."""
    import json
    from pathlib import Path

    from bench.exposure_cost import run

    with _stdout_to_stderr():
        out = run(Path(path).resolve(), reps=reps, block=block)
    typer.echo(json.dumps(out, indent=2 if not as_json else None))


@bench_app.command("interleaving")
def bench_interleaving_cmd(
    path: str = typer.Option("../shared/data/ml-100k", help="The ml-100k folder"),
    reps: int = typer.Option(10, help="Alternating single/interleaved repetitions"),
    block: int = typer.Option(200, help="Recommends per block"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """In-process cost of team-draft interleaving against the champion alone (alternating blocks)."""
    import json
    from pathlib import Path

    from bench.exposure_cost import run_interleaving

    with _stdout_to_stderr():
        out = run_interleaving(Path(path).resolve(), reps=reps, block=block)
    typer.echo(json.dumps(out, indent=2 if not as_json else None))


@bench_app.command("exploration")
def bench_exploration_cmd(
    path: str = typer.Option("../shared/data/ml-100k", help="The ml-100k folder"),
    policy: str = typer.Option("epsilon:0.1", help="Exploration policy (epsilon:EPS | plackett_luce:tau=T,n=N)"),
    reps: int = typer.Option(10, help="Alternating greedy/explore repetitions"),
    block: int = typer.Option(200, help="Recommends per block"),
    exposure_log: bool = typer.Option(True, "--exposure-log/--no-exposure-log",
                                      help="Record every answer (both configurations), as the service does"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """In-process cost of exploring (sampling the slate and its propensities) against greedy ranking."""
    import json
    from pathlib import Path

    from bench.exposure_cost import run_exploration

    with _stdout_to_stderr():
        out = run_exploration(Path(path).resolve(), policy=policy, reps=reps, block=block, exposure_log=exposure_log)
    typer.echo(json.dumps(out, indent=2 if not as_json else None))


@bench_app.command("rerank")
def bench_rerank_cmd(
    path: str = typer.Option("../shared/data/ml-100k", help="The ml-100k folder"),
    reps: int = typer.Option(10, help="Alternating off/on repetitions per option set"),
    block: int = typer.Option(200, help="Recommends per block"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """In-process cost of diversity re-ranking (MMR, DPP; N = 100, k = 10) and of explain, each against off."""
    import json
    from pathlib import Path

    from bench.rerank_study import overhead_study

    with _stdout_to_stderr():
        out = overhead_study(Path(path).resolve(), reps=reps, block=block)
    typer.echo(json.dumps(out, indent=2 if not as_json else None))


@bench_app.command("ope")
def bench_ope_cmd(
    path: str = typer.Option("../shared/data/ml-100k", help="The ml-100k folder"),
    quick: bool = typer.Option(False, "--quick", help="2 seeds, 40 users, 1-epoch models: a smoke test"),
    seeds: int = typer.Option(None, help="Seeds 0..N-1 (default 20)"),
    users: int = typer.Option(None, help="Simulated users per seed, one session each (default 500; 0: all)"),
    policy: str = typer.Option(None, help="The logging exploration policy (default epsilon:0.1)"),
    price: bool = typer.Option(True, "--price/--no-price", help="Also the price-of-exploring rounds (eps 0/0.05/0.1)"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """Off-policy estimates (SNIPS, DR) of a model's top-slot CTR from an epsilon-greedy log against the CTR it
    then earns online, with simulated users over the in-process serving core; and the price of exploring."""
    import json
    from pathlib import Path

    from bench.ope_study import run_ope_study

    kw: dict = {}
    if seeds is not None:
        kw["seeds"] = tuple(range(seeds))
    if users is not None:
        kw["users"] = users or None
    if policy is not None:
        kw["logging_policy"] = policy
    if not price:
        kw["price_epsilons"] = None
    with _stdout_to_stderr():
        out = run_ope_study("movielens-100k", Path(path).resolve(), quick=quick, **kw)
    typer.echo(json.dumps(out, indent=2 if not as_json else None, allow_nan=False))


@bench_app.command("features")
def bench_features_cmd(
    path: str = typer.Option(None, help="The ml-100k folder (default: recloop.sources download cache)"),
    stores: str = typer.Option("sqlite,redis", help="Online stores to measure, comma separated"),
    reads: int = typer.Option(1000, help="Single-user online reads per store"),
    feast_engine: bool = typer.Option(False, help="Also time Feast's own materialize (dask, slow)"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="One JSON document on stdout (the only output)"),
) -> None:
    """Online read p50/p99 (SQLite, Redis), ml-100k materialisation and catalogue embedding; JSON."""
    import json
    from pathlib import Path

    from bench.features import run_feature_benchmark

    backends = tuple(s.strip() for s in stores.split(",") if s.strip())
    try:
        with _stdout_to_stderr():
            out = run_feature_benchmark(Path(path) if path else None, backends, n_reads=reads,
                                        feast_engine=feast_engine)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"bench features failed: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(json.dumps(out, indent=2 if not as_json else None))


@bench_app.command("quality")
def bench_quality_cmd(
    source: str = typer.Option("movielens-100k", help="Source name, e.g. movielens-100k"),
    path: str = typer.Option(..., help="Folder of the data, e.g. ../shared/data/ml-100k"),
    models: str = typer.Option("all", help="Sequential models to train, comma separated (default: every "
                               "registered one: sasrec, gru4rec)"),
    max_len: int = typer.Option(None, "--max-len", help="Models' max_seq_len (default: settings.max_seq_len)"),
    epochs: int = typer.Option(None, help="Max epochs (early stopping on val NDCG@10)"),
    seed: int = typer.Option(42, help="Seed of the trainings"),
    max_train_seconds: float = typer.Option(None, help="Wall-clock budget of each training"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table"),
    progress: bool = typer.Option(True, help="Show the training progress bar (table mode only)"),
    text: bool = typer.Option(False, "--text", help="Instead: ID-only vs text-aware vs text-only SASRec+ and a "
                              "content-only baseline, overall and on cold-item targets (bench/text_quality.py)"),
) -> None:
    """Train every sequential model and MostPop/ItemKNN/EASE/Markov1 on one leave-one-out split; full ranking."""
    import json
    from pathlib import Path

    if text:
        from bench.text_quality import run_text_bench

        with _stdout_to_stderr(True):
            report = run_text_bench(source, Path(path), seed=seed, epochs=epochs or 200,
                                    max_train_seconds=max_train_seconds, progress=progress and not as_json)
        typer.echo(json.dumps(report, indent=None if as_json else 1, default=str))
        return
    from bench.quality import print_table, run_bench

    options = {k: v for k, v in {"max_len": max_len, "epochs": epochs}.items() if v is not None}
    budget = {"max_train_seconds": max_train_seconds} if max_train_seconds else None
    names = None if models == "all" else [m.strip() for m in models.split(",") if m.strip()]
    try:
        with _stdout_to_stderr(as_json):
            report = run_bench(source, Path(path), seed=seed, progress=progress and not as_json,
                               train_config=budget, models=names, **options)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"bench quality failed: {err}", err=True)
        raise typer.Exit(1) from err
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        print_table(report)


@bench_app.command("text-cost")
def bench_text_cost_cmd(
    path: str = typer.Option(..., help="The ml-latest-small folder (the 10,000-item catalogue)"),
    skip_embedding: bool = typer.Option(False, help="Only the in-process recommend and query costs"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document"),
) -> None:
    """Costs of text-aware items: embedding a 10,000-item catalogue, recommend overhead, query cost (in-process)."""
    import json
    from pathlib import Path

    from bench.text_cost import run_text_cost

    with _stdout_to_stderr(True):
        report = run_text_cost(Path(path), skip_embedding)
    typer.echo(json.dumps(report, indent=None if as_json else 1))


catalog_app = typer.Typer(no_args_is_help=True, help="New catalogue items (served at once by a text-aware model).")
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("add")
def catalog_add_cmd(
    file: str = typer.Argument(..., help="CSV or Parquet of items: item_id, title, genres (pipe-separated), text"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document"),
) -> None:
    """Add a batch of new items to the shared catalogue (recloop/catalog.py); every serving worker sees them."""
    import json
    from pathlib import Path

    import pandas as pd

    from recloop.catalog import CatalogStore
    from recloop.contract import coerce_items
    from recloop.settings import get_settings

    src = Path(file)
    frame = pd.read_parquet(src) if src.suffix == ".parquet" else pd.read_csv(src, dtype=str, keep_default_na=False)
    try:
        items = coerce_items(frame)
        rows = [{"item_id": r.item_id, "title": r.title, "genres": list(r.genres), "text": r.text or None}
                for r in items.itertuples()]
        with CatalogStore(get_settings().event_log_uri) as store:
            new = store.add(rows)
    except ValueError as err:
        typer.echo(f"catalog add failed: {err}", err=True)
        raise typer.Exit(1) from err
    out = {"added": new, "updated": len(rows) - len(new)}
    typer.echo(json.dumps(out) if as_json else f"added {len(new)} new items, updated {out['updated']}")


def _stdout_to_stderr(enabled: bool = True) -> contextlib.AbstractContextManager:
    """While a ``--json`` command works, library chatter (e.g. Feast's "Materializing ...") goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if enabled else contextlib.nullcontext()


def _prefect_env() -> None:
    """Point this process's Prefect client at the local server before any flow import."""
    from cli.platform import point_prefect_at_server
    from recloop.settings import get_settings

    point_prefect_at_server(get_settings())


@app.command()
def up(
    only: list[str] = typer.Option(None, "--only", help="Start only these services (prefect, mlflow, serving, runner)"),
) -> None:
    """Start the Prefect server, MLflow UI, BentoML recommender and the deployment runner on loopback.

    Exit 1, with nothing started, when a service's port is already taken (the holder's pid and command
    are named, and whether it is a leftover of ours that `recloop down` stops).
    """
    from cli import platform
    from recloop.settings import get_settings
    from supervisor import services

    settings = get_settings()
    names = tuple(only) if only else services.SERVICE_ORDER
    try:
        pids = platform.up(settings, names)
    except (RuntimeError, ValueError) as err:
        typer.echo(f"up failed: {err}", err=True)
        raise typer.Exit(1) from err
    for name, pid in pids.items():
        typer.echo(f"{name:<8} pid {pid:<7} log {services.log_path(settings, name)}")
    platform.print_urls(settings)


@app.command()
def down() -> None:
    """Stop every service started by `recloop up` / `recloop demo`: whole process trees, orphans included."""
    from cli import platform
    from recloop.settings import get_settings

    stopped = platform.down(get_settings())
    typer.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def demo(
    source: str = typer.Option("synthetic", help="Data source (default: the embedded synthetic data)"),
    path: str = typer.Option(None, help="File or folder of the source"),
    epochs: int = typer.Option(None, help="Training epochs (default 20)"),
    user: str = typer.Option(None, help="User to show recommendations for"),
    max_train_seconds: float = typer.Option(
        DEMO_TRAIN_SECONDS, min=1.0, help="Wall-clock budget of the training (early stopping usually ends it first "
        "on an idle machine)"),
) -> None:
    """The main job: platform up, the whole pipeline, a served model answering, a click changing the next answer.

    Exit codes: 0 served and answered; 1 a service or stage failed (the message says which); 3 the
    evaluation gate held the model back and nothing serves (the message gives the gate's reasons).
    """
    _prefect_env()
    from cli.platform import NoChampionError
    from cli.platform import demo as run_demo

    try:
        run_demo(source=source, path=path, epochs=epochs, user_id=user, max_train_seconds=max_train_seconds)
    except NoChampionError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(3) from err
    except (RuntimeError, httpx.HTTPError) as err:  # PortInUseError, a service not healthy, DeployError
        typer.echo(f"demo failed: {err}", err=True)
        raise typer.Exit(1) from err


@app.command()
def pipeline(
    source: str = typer.Option("synthetic", help="Data source name"),
    path: str = typer.Option(None, help="File or folder of the source"),
    epochs: int = typer.Option(None, help="Training epochs"),
    deploy: bool = typer.Option(True, help="Make the service serve the champion afterwards"),
) -> None:
    """Run the pipeline flow once against the local Prefect server (`recloop up --only prefect` first)."""
    _prefect_env()
    from flows.pipeline import pipeline_flow, summary_markdown

    stages = pipeline_flow(source=source, path=path, train_params={"epochs": epochs} if epochs else None,
                           deploy=deploy)
    typer.echo(summary_markdown("recloop pipeline", stages))


@app.command()
def loop(
    source: str = typer.Option(None, help="Also ingest this new source batch"),
    path: str = typer.Option(None, help="File or folder of that source"),
    deploy: bool = typer.Option(True, help="Redeploy when the gate promotes"),
) -> None:
    """Run one turn of the continuous loop now (the deployment runs it on a schedule)."""
    _prefect_env()

    from flows.loop import loop_flow

    stages = loop_flow(source=source, path=path, deploy=deploy, trigger="manual")
    typer.echo(f"status={stages['status']} new_events={stages['new_events']} "
               f"watermark={stages['watermark_from']}->{stages['watermark_to']}")
    if stages["status"] == "done":
        from flows.pipeline import summary_markdown

        typer.echo(summary_markdown("recloop continuous loop", stages))


@app.command()
def simulate(
    users: int = typer.Option(50, min=1, help="Simulated users (sampled with --seed from the dataset's users)"),
    rounds: int = typer.Option(2, min=1, help="Rounds; the loop runs between two rounds"),
    sessions_per_round: int = typer.Option(2, "--sessions-per-round", min=1, help="Sessions per user and round"),
    seed: int = typer.Option(0, help="Seed of the user sample and the simulator"),
    source: str = typer.Option("movielens-100k", help="Data source of the scratch platform"),
    path: str = typer.Option(None, help="File or folder of the source"),
    target: str = typer.Option(None, "--target", help="Drive this running service (its users and ground truth "
                               "come from the lake of RECLOOP_HOME) instead of a scratch platform"),
    loop: bool = typer.Option(None, "--loop/--no-loop", help="Run the loop flow between rounds (default: on for "
                              "the scratch platform, off with --target)"),
    truth: str = typer.Option("ease", help="The simulated users' ground truth: ease | itemknn"),
    k: int = typer.Option(10, min=1, help="Slate length"),
    epochs: int = typer.Option(None, help="Epochs of the scratch platform's first model (default 20)"),
    max_train_seconds: float = typer.Option(90.0, min=1.0, help="Training budget of the first model"),
    home: str = typer.Option(None, help="Scratch home (default a new temp dir; kept after the run)"),
    force_first: bool = typer.Option(False, "--force-first", help="Serve the scratch platform's first model even "
                                     "when the gate holds it back (tagged forced; stated in the protocol)"),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout (progress on stderr)"),
) -> None:
    """Simulated users against the real HTTP service, with the real loop (retrain, gate, deploy) between rounds.

    By default a scratch platform (own temp home, free ports) is started, fed with SOURCE, and torn down
    at the end. Reports CTR@k, skip rate, catalogue share and novelty per round, the served version and
    sessions/s; logs an MLflow run in experiment recloop-simulation. Exit codes: 0 done; 1 a failure or
    any failed request (the JSON is printed first); 3 the gate held the first model back (nothing served).
    """
    from pathlib import Path

    if truth not in ("ease", "itemknn"):
        raise typer.BadParameter(f"{truth!r}: expected ease or itemknn", param_hint="--truth")
    if target and loop:
        _prefect_env()  # the loop runs on the user's platform: its Prefect server
    from flows.simulate import GateHeldBack
    from flows.simulate import simulate as run_simulation
    from recloop.settings import get_settings

    train_params = {"epochs": epochs or 20, "max_train_seconds": max_train_seconds}
    try:
        with _stdout_to_stderr(as_json):
            result = run_simulation(get_settings(), users=users, rounds=rounds, sessions_per_round=sessions_per_round,
                                    seed=seed, target_url=target, source=source, path=path, loop=loop, truth=truth,
                                    k=k, train_params=train_params, home=Path(home) if home else None,
                                    force_first=force_first)
    except GateHeldBack as err:
        typer.echo(f"simulate: {err}\nTrain longer (--epochs N --max-train-seconds S) or pass --force-first; "
                   "the scratch platform is stopped.", err=True)
        raise typer.Exit(3) from err
    except (RuntimeError, ValueError, OSError, httpx.HTTPError) as err:
        typer.echo(f"simulate failed: {err}", err=True)
        raise typer.Exit(1) from err
    if as_json:
        typer.echo(json.dumps(result, default=str))
    else:
        from flows.simulate import rounds_markdown

        typer.echo(rounds_markdown(result))
        typer.echo(f"sessions/s {result['sessions_per_s']}; MLflow run {result['mlflow_run_id']} "
                   f"({result['mlflow_uri']}); wall {result['wall_s']} s")
    if result["errors"]:
        typer.echo(f"simulate: {result['errors']} failed requests (see error_samples per round)", err=True)
        raise typer.Exit(1)


@app.command()
def train(
    source: str = typer.Option("lake", help="'lake', 'parquet' or a source name, e.g. movielens-100k"),
    path: str = typer.Option(None, help="File or folder of the data (lake: default <home>/lake)"),
    model: str = typer.Option(None, "--model", help="Model class: sasrec, gru4rec (default: settings.model_class, "
                              "or the warm-start model's)"),
    epochs: int = typer.Option(None, help="Max epochs (early stopping on val NDCG@10)"),
    max_len: int = typer.Option(None, "--max-len", help="The model's max_seq_len (default: settings)"),
    d_model: int = typer.Option(None, help="The model's width"),
    lr: float = typer.Option(None, help="AdamW learning rate"),
    warm_start: str = typer.Option(None, help="Version number or @alias to warm-start from"),
    promote: bool = typer.Option(None, "--promote/--no-promote", help="Override settings.auto_promote"),
) -> None:
    """Train a candidate (one MLflow run), evaluate it against champion + baselines, apply the gate."""
    import httpx

    from recloop.settings import get_settings

    try:  # use the local Prefect server when it answers, else an ephemeral one
        if httpx.get(get_settings().prefect_api_url.rstrip("/") + "/health", timeout=1.0).status_code == 200:
            _prefect_env()
    except httpx.HTTPError:
        pass
    from rich.console import Console
    from rich.markdown import Markdown

    from flows.evaluate import evaluate_flow
    from flows.train import train_flow

    model_params = {k: v for k, v in {"max_seq_len": max_len, "d_model": d_model}.items() if v is not None}
    train_params = {k: v for k, v in {"epochs": epochs, "lr": lr}.items() if v is not None}
    from models.factory import MODELS

    if model is not None and model not in MODELS:
        typer.echo(f"train failed: --model={model!r}; expected one of {sorted(MODELS)}", err=True)
        raise typer.Exit(2)
    trained = train_flow(source=source, path=path, model_params=model_params, train_params=train_params,
                         warm_start_from=warm_start, model=model)
    result = evaluate_flow(trained["run_id"], auto_promote=promote)
    console = Console()
    console.print(f"run {result['run_id']} -> model version {result['version']} "
                  f"(gate {'PASS' if result['passed'] else 'FAIL'}, promoted={result['promoted']})")
    console.print(Markdown(result["report_md"]))


@app.command()
def tune(
    source: str = typer.Option("lake", help="'lake', 'parquet' or a source name, e.g. movielens-100k"),
    path: str = typer.Option(None, help="File or folder of the data"),
    trials: int = typer.Option(20, min=1, help="Finished trials the study should have (a rerun continues it)"),
    model: str = typer.Option(None, "--model", help="Model class (default: settings.model_class)"),
    epochs: int = typer.Option(None, help="Max epochs per trial (early stopping and pruning apply)"),
    max_train_seconds: float = typer.Option(None, "--max-train-seconds", help="Wall-clock budget per trial"),
    num_threads: int = typer.Option(None, "--num-threads", min=1, help="CPU threads per trial (default: all cores)"),
    defaults_seeds: int = typer.Option(0, "--defaults-seeds", min=0,
                                       help="Also train the untuned defaults with N seeds (mean and sd reported)"),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout (progress on stderr)"),
) -> None:
    """Hyper-parameter search (Optuna TPE + median pruning on validation NDCG@10); the next cold train uses the best."""
    import logging

    from models.factory import MODELS

    if model is not None and model not in MODELS:
        typer.echo(f"tune failed: --model={model!r}; expected one of {sorted(MODELS)}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from flows.tune import run_study

    budget = {k: v for k, v in {"epochs": epochs, "max_train_seconds": max_train_seconds,
                                "num_threads": num_threads}.items() if v is not None}
    try:
        with _stdout_to_stderr(as_json):
            report = run_study(source, path, trials, model=model, train_params=budget, defaults_seeds=defaults_seeds)
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"tune failed: {err}", err=True)
        raise typer.Exit(1) from err
    if as_json:
        typer.echo(json.dumps(report, default=str))
    else:
        best = report["best"]
        typer.echo(f"study {report['study']} ({report['storage']}): {report['trials']['finished']} trials, "
                   f"best #{best['trial']} val NDCG@10 {best['value']:.4f}, "
                   f"test NDCG@10 {report['test']['ndcg@10']:.4f}")
        typer.echo(f"best parameters (MLflow run {report['best_run_id']}, read by the next cold train): "
                   f"{json.dumps(best['params'])}")
        if report["defaults"]:
            d = report["defaults"]
            typer.echo(f"defaults: val NDCG@10 mean {d['mean']:.4f} sd {d['sd']:.4f} over {d['seeds']} seeds")


@model_app.command("list")
def model_list() -> None:
    """List the registered versions with their aliases and gate results."""
    from rich.console import Console
    from rich.table import Table

    from recloop.settings import get_settings
    from registry.aliases import list_versions
    from registry.tracking import configure_tracking

    settings = get_settings()
    rows = list_versions(configure_tracking(settings), settings.model_name)
    table = Table(title=f"{settings.model_name} ({settings.mlflow_uri})")
    for column in ("version", "aliases", "gate", "ndcg@10", "coverage@10", "run_id"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(row[c] for c in ("version", "aliases", "gate", "ndcg@10", "coverage@10", "run_id")))
    table.caption = ("test metrics of each version on the data it was evaluated on (the gate compares a candidate "
                     "with the champion on the same split)")
    Console().print(table)


@model_app.command("promote")
def model_promote(
    version: str = typer.Argument(..., help="The version to serve"),
    force: bool = typer.Option(False, "--force", help="Promote even if the version failed the gate or does not "
                               "load in a fresh process (tagged forced=true, promoted_by='cli --force')"),
) -> None:
    """Point the served alias (RECLOOP_MODEL_ALIAS, default champion) at VERSION (the previous one is kept).

    Refused (exit 1) when VERSION failed the evaluation gate, was trained before a user was forgotten
    (recloop.holds_forgotten_users=true) or does not load and smoke-score in a fresh process (up to ~2 min),
    unless --force.
    """
    from mlflow.exceptions import MlflowException

    from recloop.settings import get_settings
    from registry.aliases import PromotionRefused, promote_checked
    from registry.tracking import configure_tracking

    settings = get_settings()
    try:
        move = promote_checked(configure_tracking(settings), settings.model_name, version,
                               alias=settings.model_alias, tracking_uri=settings.mlflow_uri, force=force,
                               reason="cli")
    except PromotionRefused as err:
        typer.echo(f"promote refused: {err} (--force promotes anyway)", err=True)
        raise typer.Exit(1) from err
    except MlflowException as err:
        typer.echo(f"promote failed: {err.message}", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"{move.alias}: {move.previous} -> {move.version}")


@model_app.command("rollback")
def model_rollback(
    force: bool = typer.Option(False, "--force", help="Roll back even to a version trained before a user was "
                               "forgotten (recloop.holds_forgotten_users=true; tagged restored_over)"),
) -> None:
    """Move the served alias (RECLOOP_MODEL_ALIAS, default champion) back to its previous version.

    Refused (exit 1) when that version holds forgotten users, unless --force.
    """
    from recloop.settings import get_settings
    from registry.aliases import PromotionRefused, rollback
    from registry.tracking import configure_tracking

    settings = get_settings()
    try:
        move = rollback(configure_tracking(settings), settings.model_name, alias=settings.model_alias, force=force)
    except PromotionRefused as err:
        typer.echo(f"rollback refused: {err} (--force rolls back anyway)", err=True)
        raise typer.Exit(1) from err
    except LookupError as err:
        typer.echo(f"rollback failed: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(f"{move.alias}: {move.previous} -> {move.version}")


@online_app.command("resync")
def online_resync(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON")) -> None:
    """Rewrite every user's online history from the lake snapshot plus the event-log tail.

    For an online store that lost its rows (e.g. a Redis restarted empty); the service also does it
    at start-up and when it finds the store empty. Exit 1 when the store cannot be written.
    """
    from featurestore.online import OnlineStoreUnavailable
    from flows.features import materialised_history_len, resync_online_history
    from recloop.settings import get_settings

    settings = get_settings()
    try:
        with _stdout_to_stderr(as_json):
            # as long as the served (or tuned) model reads
            report = resync_online_history(settings, materialised_history_len(settings))
    except KeyError as err:  # the feature service is not applied yet
        typer.echo(f"online resync failed: {err.args[0]}", err=True)
        raise typer.Exit(1) from err
    except OnlineStoreUnavailable as err:
        typer.echo(f"online resync failed: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(json.dumps(report) if as_json else
               f"re-synced {report['users']} users ({report['log_users']} with log events) in {report['seconds']} s")


@app.command("monitor")
def monitor_cmd(
    check: list[str] = typer.Option(None, "--check", help="drift | ctr | freshness | health (repeatable; default all)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document"),
) -> None:
    """Run the monitors once now: data drift, online CTR, feature freshness, serving health.

    An alert emits a Prefect event; drift and freshness events start the loop deployment (docs/operations.md,
    "Monitors"). The deployment runs it on settings.monitor_cron. Exit 1 on an unknown check, or when the
    Prefect server does not answer (`recloop up` starts it): one line on stderr, nothing on stdout.
    """
    _prefect_env()
    import httpx

    from flows.watch import monitor_flow
    from recloop.settings import get_settings

    api = get_settings().prefect_api_url
    try:
        httpx.get(f"{api.rstrip('/')}/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as err:
        typer.echo(f"monitor failed: the Prefect API at {api} does not answer ({type(err).__name__}); "
                   "start it with `recloop up`", err=True)
        raise typer.Exit(1) from err
    try:
        with _stdout_to_stderr(as_json):
            out = monitor_flow(checks=check or None)
    except ValueError as err:
        typer.echo(f"monitor failed: {err}", err=True)
        raise typer.Exit(1) from err
    if as_json:
        typer.echo(json.dumps(out, default=str))
        return
    for name, result in out["checks"].items():
        typer.echo(f"{name}: {result.get('status')}")
    typer.echo(f"events emitted: {', '.join(out['emitted']) or 'none'}")


@app.command("online-metrics")
def online_metrics_cmd(
    since: str = typer.Option(None, help="Only exposures shown (and events received) after this ISO time (UTC)"),
    by: str = typer.Option("variant", help="Group by: variant (served alias), version (model version), position"),
    k: int = typer.Option(10, min=1, help="The cut-off of CTR@k"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table"),
) -> None:
    """CTR@k, CTR by position, skip rate, request CTR and catalogue share from the exposure log.

    Clicks and skips are the event policy's positive and negative events linked by request_id to a
    shown item (docs/operations.md, "Online metrics"). Exit 1 on a bad --since/--by.
    """
    from rich.console import Console
    from rich.table import Table

    from recloop.online_metrics import online_report
    from recloop.settings import get_settings

    settings = get_settings()
    try:
        with _stdout_to_stderr(as_json):
            report = online_report(settings.event_log_uri, settings.lake_path, settings.event_policy,
                                   since=since, by=by, k=k, freshness_days=settings.freshness_days)
    except ValueError as err:
        typer.echo(f"online-metrics failed: {err}", err=True)
        raise typer.Exit(1) from err
    if as_json:
        typer.echo(json.dumps(report))
        return
    cols = (("impressions", "clicks", "ctr", "skips", "skip_rate") if by == "position" else
            ("requests", "impressions", f"ctr@{k}", "request_ctr", "skip_rate", "catalogue_share", "model_versions"))
    table = Table(title=f"online metrics by {by} since {report['protocol']['since'] or 'the start'}")
    table.add_column(by)
    for col in cols:  # headers with spaces wrap instead of being cut in a narrow terminal
        table.add_column(col.replace("_", " "), justify="right")
    rows = [*report["groups"].items(), ("overall", report["overall"])]
    for key, group in rows:
        cells = [group.get(c) for c in cols]
        table.add_row(key or "(none)", *("-" if v is None else f"{v:.4f}" if isinstance(v, float)
                                         else ",".join(v) if isinstance(v, list) else str(v) for v in cells))
    overall = report["overall"]
    table.caption = (f"clicks = {report['protocol']['positive']}, skips = {report['protocol']['negative']}; "
                     f"unattributed events {overall['unattributed']}, position mismatches "
                     f"{overall['position_mismatch']}")
    Console().print(table)


def _weights_option(text: str) -> tuple[float, float]:
    """``--weights 90,10`` → (90.0, 10.0); typer.BadParameter (exit 2) when not two positive numbers."""
    import math

    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError as err:
        raise typer.BadParameter(f"{text!r}: expected two numbers, e.g. 50,50") from err
    if len(weights) != 2 or not all(0 < w < math.inf for w in weights):
        raise typer.BadParameter(f"{text!r}: expected two positive numbers, e.g. 50,50 or 90,10")
    return weights[0], weights[1]


def _experiment_fail(action: str, err: Exception, code: int = 1) -> typer.Exit:
    typer.echo(f"experiment {action} failed: {err}", err=True)
    return typer.Exit(code)


@experiment_app.command("start")
def experiment_start(
    challenger: str = typer.Option(..., "--challenger", help="The challenger: a version number or @ALIAS "
                                   "(resolved once, now)"),
    mode: str = typer.Option("ab", "--mode", help="ab (each user sees one arm) or interleave (both arms' lists "
                             "merged for every user)"),
    weights: str = typer.Option("50,50", "--weights", help="champion,challenger traffic weights of an A/B test"),
    explore_champion: str | None = typer.Option(
        None, "--explore-champion", help="The champion arm's exploration policy (greedy | epsilon:0.1 | "
        "plackett_luce:tau=0.5,n=50); default: the service's (RECLOOP_EXPLORATION)"),
    explore_challenger: str | None = typer.Option(
        None, "--explore-challenger", help="The challenger arm's exploration policy; default: the service's"),
    rerank_champion: str | None = typer.Option(
        None, "--rerank-champion", help="The champion arm's diversity re-ranking, METHOD:DIVERSITY (mmr:0.3 | "
        "dpp:0.5); default none. A request's own diversity wins"),
    rerank_challenger: str | None = typer.Option(
        None, "--rerank-challenger", help="The challenger arm's diversity re-ranking (mmr:0.3 | dpp:0.5)"),
    as_json: bool = typer.Option(False, "--json", help="Print the experiment as one JSON document"),
) -> None:
    """Start an online experiment: the version the served alias points to now against CHALLENGER.

    Serving splits users by a salted hash of their id (a user keeps one arm); automatic promotion
    pauses until the experiment is concluded. Each arm may explore with its own policy (its
    propensities are logged with every exposure, for off-policy estimates) and its own diversity
    re-ranking (MMR or DPP with a diversity in [0, 1]). Exit 1: one is already running, no champion, or an
    unknown version/alias; exit 2: a bad --mode/--weights/--explore-*/--rerank-*, or the challenger is the
    champion.
    """
    from mlflow.exceptions import MlflowException

    from models.exploration import ExplorationPolicy
    from recloop.experiments import MODES, ExperimentConflict, ExperimentStore, parse_rerank
    from recloop.settings import get_settings
    from registry.aliases import get_alias_version
    from registry.tracking import configure_tracking

    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r}: expected one of {', '.join(MODES)}", param_hint="--mode")
    pair = _weights_option(weights)
    for option, text in (("--explore-champion", explore_champion), ("--explore-challenger", explore_challenger)):
        if text is not None:
            try:
                ExplorationPolicy.parse(text)
            except ValueError as err:
                raise typer.BadParameter(str(err), param_hint=option) from err
    for option, text in (("--rerank-champion", rerank_champion), ("--rerank-challenger", rerank_challenger)):
        if text is not None and text.strip():
            try:
                parse_rerank(text)
            except ValueError as err:
                raise typer.BadParameter(str(err), param_hint=option) from err
    settings = get_settings()
    name, alias = settings.model_name, settings.model_alias
    with _stdout_to_stderr(as_json):
        client = configure_tracking(settings)
        try:
            champion = get_alias_version(client, name, alias)
            if champion is None:
                raise _experiment_fail("start", LookupError(f"{name!r} has no {alias!r} version to test against"))
            if challenger.startswith("@"):
                version = get_alias_version(client, name, challenger[1:])
                if version is None:
                    raise _experiment_fail("start", LookupError(f"{name!r} has no alias {challenger[1:]!r}"))
            else:
                version = str(client.get_model_version(name, challenger.strip()).version)
        except MlflowException as err:
            raise _experiment_fail("start", LookupError(f"unknown version {challenger!r} of {name!r}: "
                                                        f"{err.message}")) from err
        if version == champion:
            raise _experiment_fail("start", ValueError(f"the challenger ({challenger} = version {version}) is the "
                                                       f"{alias}; pick another version"), code=2)
        store = ExperimentStore(settings.event_log_uri)
        try:
            experiment = store.start(mode=mode, champion_version=champion, challenger_version=version, weights=pair,
                                     exploration=(explore_champion, explore_challenger),
                                     parse_exploration=ExplorationPolicy.parse,
                                     rerank=(rerank_champion, rerank_challenger))
        except ExperimentConflict as err:
            raise _experiment_fail("start", err) from err
        finally:
            store.close()
    if as_json:
        typer.echo(json.dumps(experiment.as_dict()))
        return
    split = "interleaved" if mode == "interleave" else f"{pair[0]:g}/{pair[1]:g}"
    explored = ""
    if experiment.exploration != (None, None):
        explored = "; exploration " + ", ".join(f"{arm} {text or 'the service policy'}" for arm, text in
                                                zip(("champion", "challenger"), experiment.exploration, strict=True))
    if experiment.rerank != (None, None):
        explored += "; re-ranking " + ", ".join(f"{arm} {text or 'none'}" for arm, text in
                                                zip(("champion", "challenger"), experiment.rerank, strict=True))
    typer.echo(f"started {experiment.experiment_id}: {alias} version {champion} vs challenger version {version} "
               f"({mode}, {split}{explored}); automatic promotion pauses until `recloop experiment conclude`")


@experiment_app.command("status")
def experiment_status(as_json: bool = typer.Option(False, "--json", help="Print one JSON document")) -> None:
    """The running online experiment (else the latest) and its current report. Exit 1 when there is none."""
    from flows.experiment import experiment_report, report_markdown
    from recloop.experiments import CONCLUDED, ExperimentStore
    from recloop.settings import get_settings

    settings = get_settings()
    with _stdout_to_stderr(as_json):
        with ExperimentStore(settings.event_log_uri) as store:
            experiment = store.active() or store.latest()
        if experiment is None:
            raise _experiment_fail("status", LookupError("no online experiment has been started"))
        report = (experiment.result if experiment.status == CONCLUDED and experiment.result is not None
                  else experiment_report(experiment, settings))
    if as_json:
        definition = {k: v for k, v in experiment.as_dict().items() if k != "result"}  # the result is the report
        typer.echo(json.dumps({"experiment": definition, "report": report}, default=str))
        return
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(report_markdown(experiment, report, full=False)))


@experiment_app.command("stop")
def experiment_stop(as_json: bool = typer.Option(False, "--json", help="Print the experiment as JSON")) -> None:
    """Stop the running online experiment: every user gets the champion again. Exit 1 when none runs.

    Nothing is promoted; `recloop experiment conclude` analyses it and acts on the outcome.
    """
    from recloop.experiments import ExperimentStore, NoRunningExperiment
    from recloop.settings import get_settings

    with _stdout_to_stderr(as_json):
        with ExperimentStore(get_settings().event_log_uri) as store:
            try:
                experiment = store.stop()
            except NoRunningExperiment as err:
                raise _experiment_fail("stop", err) from err
    typer.echo(json.dumps(experiment.as_dict()) if as_json else
               f"stopped {experiment.experiment_id}; conclude it with `recloop experiment conclude`")


@experiment_app.command("conclude")
def experiment_conclude(
    force: bool = typer.Option(False, "--force", help="Promote a winning challenger even if it failed the offline "
                               "gate or does not load (tagged forced=true, experiment.forced=true)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document"),
) -> None:
    """Stop the online experiment (if running), analyse it, and promote the challenger if it won.

    The promotion goes through the checks of `recloop model promote` (it must load in a fresh process;
    a version that failed the gate needs --force). A winning champion, or no winner, leaves the alias.
    Both versions get experiment.* tags in MLflow. Exit 1: nothing to conclude, or the promotion was
    refused (the experiment then stays stopped; conclude again with --force).
    """
    from mlflow.exceptions import MlflowException

    from flows.experiment import conclude_experiment
    from recloop.experiments import NoRunningExperiment
    from recloop.settings import get_settings
    from registry.aliases import PromotionRefused

    with _stdout_to_stderr(as_json):
        try:
            out = conclude_experiment(get_settings(), force=force)
        except NoRunningExperiment as err:
            raise _experiment_fail("conclude", err) from err
        except PromotionRefused as err:
            typer.echo(f"experiment conclude refused: {err}; the experiment is stopped, not concluded "
                       "(--force promotes anyway)", err=True)
            raise typer.Exit(1) from err
        except MlflowException as err:
            raise _experiment_fail("conclude", RuntimeError(err.message)) from err
    if as_json:
        typer.echo(json.dumps(out, default=str))
        return
    decision = out["report"].get("decision") or {}
    winner = decision.get("winner")
    typer.echo(f"concluded {out['experiment']['experiment_id']}: "
               + ("no winner" if winner is None else f"{winner} wins")
               + (f" ({decision.get('test')}, p = {decision.get('p_value')})" if decision.get("test") else "")
               + (f"; promoted version {out['alias_version']}" if out["promoted"] else
                  f"; the alias stays on version {out['alias_version']}"))
    if decision.get("reason"):
        typer.echo(decision["reason"])


@app.command("mlflow-ui")
def mlflow_ui(port: int = typer.Option(None, help="Port (default settings.mlflow_port)")) -> None:
    """Run the MLflow UI/server on 127.0.0.1 over the configured backend (foreground; Ctrl-C stops)."""
    import os
    import subprocess

    from recloop.settings import get_settings
    from registry.tracking import SERVER_ENV, configure_tracking, server_command

    settings = get_settings()
    configure_tracking(settings)  # creates the SQLite schema once, before the server's workers
    cmd = server_command(settings, port)
    typer.echo(f"MLflow UI on http://127.0.0.1:{port or settings.mlflow_port} ({settings.mlflow_uri})")
    env = {**os.environ, **SERVER_ENV}
    raise typer.Exit(subprocess.run(cmd, env=env, check=False).returncode)


def main() -> None:
    """Console-script entry point: apply the telemetry opt-outs, then dispatch."""
    configure_environment()
    app()


if __name__ == "__main__":
    main()


def _blocklist_run(action: str, item_ids: list[str], as_json: bool, **kw: object) -> None:
    """Run one blocklist action on the event-log database; one JSON document on stdout with ``--json``."""
    from recloop.blocklist import BlocklistStore
    from recloop.settings import get_settings

    with _stdout_to_stderr(as_json):
        with BlocklistStore(get_settings().event_log_uri) as store:
            try:
                if action == "add":
                    changed = store.add(item_ids, **kw)  # type: ignore[arg-type]
                elif action == "remove":
                    changed = store.remove(item_ids)
                else:
                    changed = []
            except ValueError as err:
                typer.echo(f"blocklist {action} failed: {err}", err=True)
                raise typer.Exit(1) from err
            items = store.list()
    if as_json:
        typer.echo(json.dumps({"action": action, "changed": changed, "items": items}))
    elif action == "list":
        for row in items:
            typer.echo(f"{row['item_id']}\t{row['kind']}\t{row['added_at']}\t{row['reason'] or ''}")
    else:
        typer.echo(f"blocklist {action}: {len(changed)} changed, {len(items)} listed")


@blocklist_app.command("add")
def blocklist_add(
    item_ids: list[str] = typer.Argument(..., help="Raw item ids"),
    kind: str = typer.Option("blocked", "--kind", help="blocked (a business rule) | retired (left the catalogue)"),
    reason: str | None = typer.Option(None, "--reason", help="Free text (at most 500 characters)"),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout"),
) -> None:
    """Hide items from every recommendation (every worker within RECLOOP_BLOCKLIST_TTL_S). Exit 1 on a bad id."""
    _blocklist_run("add", item_ids, as_json, kind=kind, reason=reason)


@blocklist_app.command("remove")
def blocklist_remove(
    item_ids: list[str] = typer.Argument(..., help="Raw item ids"),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout"),
) -> None:
    """Recommend these items again."""
    _blocklist_run("remove", item_ids, as_json)


@blocklist_app.command("list")
def blocklist_list(as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout")) -> None:
    """The listed items: item_id, kind, added_at, reason."""
    _blocklist_run("list", [], as_json)


@app.command()
def forget(
    user_id: str = typer.Argument(None, help="The raw user id to forget (omit with --receipts)"),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout"),
    retrain_now: bool = typer.Option(False, "--retrain-now", help="Then run the loop's turn now: a cold retrain "
                                     "without the user that honours the receipt (else the next scheduled turn)"),
    lock_timeout: float = typer.Option(None, "--lock-timeout", help="Wait at most this many seconds for the "
                                       "loop's lock (default: until the running turn ends)"),
    receipts: bool = typer.Option(False, "--receipts", help="List the deletion receipts instead (hashes only)"),
) -> None:
    """Forget USER_ID: tombstone, then delete it from every store (event log, exposures, lake, quarantine,
    validation docs, feature tables, online store), tag the registry's versions; the model forgets at the next
    retrain. Exit 1 on a bad id or when rows were left; 2 when the loop's lock was not free in time (pending).
    """
    from recloop.forget import ForgetIncomplete, ForgetStore
    from recloop.pseudonym import identity_or
    from recloop.settings import get_settings
    from serving.forget import forget_user

    settings = get_settings()
    if receipts:
        with ForgetStore(settings.event_log_uri) as store:
            rows = store.receipts()
        typer.echo(json.dumps({"receipts": rows}) if as_json else
                   "\n".join(f"{r['user_hash'][:16]}…\t{r['status']}\t{r['requested_at']}\t{r['honoured_by'] or ''}"
                             for r in rows) or "no receipts")
        return
    if user_id is None:
        typer.echo("forget: USER_ID is required (or --receipts)", err=True)
        raise typer.Exit(2)
    try:
        with _stdout_to_stderr(as_json):
            out = forget_user(identity_or(settings)(user_id), settings, lock_timeout_s=lock_timeout)
    except (ValueError, ForgetIncomplete) as err:
        typer.echo(f"forget failed: {err}", err=True)
        raise typer.Exit(1) from err
    if retrain_now and out["status"] == "done":
        _prefect_env()
        from flows.loop import loop_flow

        with _stdout_to_stderr(as_json):
            stages = loop_flow(trigger="manual")
        out["retrain"] = {"status": stages["status"], "run_id": (stages.get("train") or {}).get("run_id"),
                          "forget": stages.get("forget")}
    if as_json:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"forget {out['status']}: receipt {out['user_hash']} rows={out['rows']}"
                   + (f" retrain={out['retrain']}" if "retrain" in out else ""))
    if out["status"] == "pending":
        raise typer.Exit(2)
