#!/usr/bin/env bash
set -euo pipefail
user=${POSTGRES_USER:-postgres}
mkdir -p "$PGDATA" && chown -R postgres:postgres "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "${POSTGRES_PASSWORD:-postgres}" > /tmp/pwfile
  su postgres -c "initdb -D $PGDATA -U $user --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 >/dev/null"
  rm /tmp/pwfile
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  su postgres -c "pg_ctl -D $PGDATA -o '-c listen_addresses=' -w start >/dev/null"
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$f" ] && su postgres -c "psql -q -U $user -d ${POSTGRES_DB:-postgres} -f $f"
  done
  su postgres -c "pg_ctl -D $PGDATA -m fast -w stop >/dev/null"
fi
exec su postgres -c "postgres -D $PGDATA -c listen_addresses=*"
