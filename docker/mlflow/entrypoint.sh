#!/bin/sh
# Entry point of the MLflow image: `mlflow server` with basic auth. MLflow reads its auth settings
# from an ini file; the users' database URL holds a password, so the file is written here from the
# environment at start instead of being baked into the image. The admin account is created on the
# first start from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD (MLflow has no default).
# MLFLOW_AUTH_CACHE_TTL_SECONDS > 0 caches verified passwords per worker for that long (each
# request otherwise pays a PBKDF2 hash; a changed password is then accepted by other workers
# until the TTL ends); 0, MLflow's default, turns the cache off.
# MLFLOW_AUTH_DEFAULT_PERMISSION is what a user holds on what nobody granted it: NO_PERMISSIONS here
# (MLflow's own default is READ), so the serving account reads only the model it is granted and a
# new user sees nothing until an admin grants it (docker/mlflow/init_users.py makes the services').
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (e.g. postgresql+psycopg2://mlflow:...@postgres/mlflow_auth)}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
# the auth app's CSRF protection needs one static key, the same for every worker and replica
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
umask 077
config_dir=$(mktemp -d)
cat > "$config_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}
INI
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"
# MLflow's job runner (8 more processes, ~2 GiB, for its GenAI jobs: judges, trace roll-ups) is
# off: the pipeline uses none of them. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns it on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server --app-name basic-auth "$@"
