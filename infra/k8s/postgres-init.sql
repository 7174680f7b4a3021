-- Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d), as POSTGRES_USER
-- in POSTGRES_DB (recloop: the event log, exposures and experiments). MLflow and Prefect get their own.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
