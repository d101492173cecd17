#!/bin/bash
# The entrypoint of dtx.local/postgresql (Debian's PostgreSQL 15): the conventions of the
# official postgres image's docker-entrypoint.sh that charts/dtx relies on, so that the
# chart runs either image unchanged:
#   - arguments starting with "-" are the server's: `postgres` is put in front of them;
#   - an empty $PGDATA is initialised with initdb: superuser $POSTGRES_USER (postgres)
#     with password $POSTGRES_PASSWORD, local socket connections trusted, TCP ones by
#     $POSTGRES_HOST_AUTH_METHOD (scram-sha-256);
#   - then, on a server listening on its socket only, the files of
#     /docker-entrypoint-initdb.d run once: *.sh executed (sourced when not executable),
#     *.sql through psql.
# Everything it writes is under $PGDATA and /var/run/postgresql (the chart's volumes), so
# the root filesystem can stay read-only.
set -Eeuo pipefail

if [ "$(id -u)" = 0 ]; then
  # As root (a plain `ctr run` or `docker run`): the server refuses root; drop to postgres.
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ "$#" -eq 0 ] || [ "${1:0:1}" = "-" ]; then
  set -- postgres "$@"
fi

say() { echo "dtx-postgresql: $*"; }

init_scripts() {
  local f
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        if [ -x "$f" ]; then
          say "running $f"
          "$f"
        else
          say "sourcing $f"
          # shellcheck disable=SC1090
          . "$f"
        fi
        ;;
      *.sql) say "running $f"; psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -f "$f" ;;
      *) [ -e "$f" ] && say "ignoring $f" ;;
    esac
  done
}

init_pgdata() {
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != "trust" ]; then
    echo "error: the database is uninitialised and POSTGRES_PASSWORD is empty" >&2
    exit 1
  fi
  say "initialising $PGDATA"
  # shellcheck disable=SC2086
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") \
    --pgdata="$PGDATA" --encoding=UTF8 --locale=C.UTF-8 ${POSTGRES_INITDB_ARGS:-}
  printf '\nhost all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"
  pg_ctl --pgdata="$PGDATA" --wait --options="-c listen_addresses='' -p ${PGPORT:-5432}" start
  if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != postgres ]; then
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
      --set=db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
  init_scripts
  pg_ctl --pgdata="$PGDATA" --wait --mode=fast stop
  say "initialised; starting the server"
}

if [ "$1" = postgres ]; then
  : "${PGDATA:=/var/lib/postgresql/data}"
  export PGDATA POSTGRES_USER="${POSTGRES_USER:-postgres}"
  mkdir -p "$PGDATA"
  chmod 0700 "$PGDATA" 2>/dev/null || true
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    init_pgdata
  fi
fi
exec "$@"
