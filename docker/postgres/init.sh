#!/bin/bash
# First start of the PostgreSQL volume: one database and role each for Airflow's metadata
# and Feast's SQL registry (passwords come from the compose environment, never from git).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE ROLE airflow LOGIN PASSWORD '${AIRFLOW_DB_PASSWORD}';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE feast LOGIN PASSWORD '${FEAST_DB_PASSWORD}';
CREATE DATABASE feast OWNER feast;
SQL
