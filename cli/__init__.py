"""Entry points: the `recloop` CLI (typer) and the local platform (up / down / demo)."""
