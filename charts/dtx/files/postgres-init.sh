#!/bin/bash
# Run once by the postgres image's entrypoint, on an empty data directory: one role and one
# database per dtx service, the database owned by its role and closed to everyone else.
# Passwords come from the environment (DTX_DB_PASSWORD_<SERVICE>, from each service's
# Secret), never from this ConfigMap.
set -euo pipefail

create() {
  local name="$1" password="$2"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set=name="$name" --set=password="$password" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
  echo "dtx: database and role $name created"
}

for var in $(compgen -e | grep '^DTX_DB_PASSWORD_' || true); do
  service="${var#DTX_DB_PASSWORD_}"
  create "${service,,}" "${!var}"
done
