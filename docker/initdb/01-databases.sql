-- Prefect and MLflow each keep an alembic_version table: give each its own database.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
-- MLflow's basic-auth users and permissions (docker/mlflow/basic_auth.ini)
CREATE DATABASE mlflow_auth;
