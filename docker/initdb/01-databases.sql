-- Prefect and MLflow each keep an alembic_version table: give each its own database.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
