#!/bin/bash
# First start of the PostgreSQL volume: a database and owner role each for Airflow's
# metadata and Feast's SQL registry, plus a SELECT-only role for the feature lookup server.
# Passwords come from the compose environment (never from git) and reach psql through
# \getenv, so they appear in no command line and no file, and any character is safe.
# Role names can be overridden (the tests run this script against a shared server).
set -euo pipefail
export AIRFLOW_DB_USER=${AIRFLOW_DB_USER:-airflow}            # role and database
export FEAST_DB_USER=${FEAST_DB_USER:-feast}                  # role and database (pipeline)
export FEAST_READER_DB_USER=${FEAST_READER_DB_USER:-feast_reader}  # lookup server

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv airflow_user AIRFLOW_DB_USER
\getenv airflow_password AIRFLOW_DB_PASSWORD
\getenv feast_user FEAST_DB_USER
\getenv feast_password FEAST_DB_PASSWORD
\getenv reader_user FEAST_READER_DB_USER
\getenv reader_password FEAST_READER_DB_PASSWORD
CREATE ROLE :"airflow_user" LOGIN PASSWORD :'airflow_password';
CREATE DATABASE :"airflow_user" OWNER :"airflow_user";
REVOKE ALL ON DATABASE :"airflow_user" FROM PUBLIC;
CREATE ROLE :"feast_user" LOGIN PASSWORD :'feast_password';
CREATE DATABASE :"feast_user" OWNER :"feast_user";
REVOKE ALL ON DATABASE :"feast_user" FROM PUBLIC;
CREATE ROLE :"reader_user" LOGIN PASSWORD :'reader_password';
GRANT CONNECT ON DATABASE :"feast_user" TO :"reader_user";
SQL

# The registry's tables are created later, by the pipeline's first `grank features register`
# (as the feast role): grant SELECT on them in advance, and nothing else.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$FEAST_DB_USER" <<'SQL'
\getenv feast_user FEAST_DB_USER
\getenv reader_user FEAST_READER_DB_USER
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"reader_user";
ALTER DEFAULT PRIVILEGES FOR ROLE :"feast_user" IN SCHEMA public
    GRANT SELECT ON TABLES TO :"reader_user";
SQL
