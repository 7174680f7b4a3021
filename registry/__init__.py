"""The model registry layer: MLflow tracking set-up, the pyfunc model store, aliases, promotion, rollback."""
