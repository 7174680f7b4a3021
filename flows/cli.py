"""The ``recloop`` command line (typer). Each command is a thin wrapper over a flow or a helper."""

from __future__ import annotations

import typer

from recloop import __version__
from recloop.settings import configure_environment

app = typer.Typer(no_args_is_help=True, add_completion=False, help="recloop: interactive recommendation MLOps.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON figures.")
model_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry: list, promote, roll back.")
app.add_typer(bench_app, name="bench")
app.add_typer(model_app, name="model")


@app.command()
def version() -> None:
    """Print the recloop version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point: apply the telemetry opt-outs, then dispatch."""
    configure_environment()
    app()


if __name__ == "__main__":
    main()
