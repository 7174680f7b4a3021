"""Entry points: the `recloop` CLI (typer) and the local platform (up / down / demo)."""

#: The demo's training budget (s). Early stopping ends an idle machine's training well before it; on a loaded
#: machine (a shared CI host) a shorter budget stopped SASRec+ after 3 epochs, below the Markov-1 baseline the
#: gate compares with, and the demo had no model to serve.
DEMO_TRAIN_SECONDS = 300.0
