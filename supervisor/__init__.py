"""The local process supervisor: start, check and stop the platform's servers (Prefect, MLflow, BentoML, runner).

Used by the CLI (`recloop up/down/demo`) and by the deploy flow (which starts the recommender when it is down).
"""
