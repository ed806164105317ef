#!/usr/bin/env bash
# Make sure the PostgreSQL server the tests use answers on 127.0.0.1:5432.
#
# On a fresh Debian machine no server runs: when root, install Debian's `postgresql`, create a
# cluster if none exists, start it, and create the role and database the tests use
# (role `kiln_test` with CREATEDB; each test session creates and drops its own database).
# Elsewhere (not root, no apt) it does nothing and the tests say they skip PostgreSQL, or fail
# under CI=true.
set -euo pipefail

ROLE=kiln_test
PASSWORD=kiln_test
HOST=127.0.0.1
PORT=5432

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "ensure_postgres: not root with apt; using whatever answers on $HOST:$PORT"
  exit 0
fi

if ! dpkg -s postgresql >/dev/null 2>&1; then
  echo "ensure_postgres: installing PostgreSQL from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

if ! pg_isready -h "$HOST" -p "$PORT" -q; then
  version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
  if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -q "^$version main$"; then
    pg_createcluster "$version" main -p "$PORT" >/dev/null
  fi
  # A container without systemd: pg_ctlcluster starts the server itself. The server keeps
  # every descriptor it inherits, and under `make -jN` those include make's pipes: make then
  # waits for ever for the server to close them (a CI run hung there until its time ran out).
  # So it starts from a subshell holding only stdin, stdout and stderr.
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ] && [ "$fd" != 255 ]; then eval "exec $fd>&-"; fi 2>/dev/null || true
    done
    exec pg_ctlcluster --skip-systemctl-redirect "$version" main start
  )
  for _ in $(seq 1 60); do
    pg_isready -h "$HOST" -p "$PORT" -q && break
    sleep 0.5
  done
  pg_isready -h "$HOST" -p "$PORT"
fi

# The tests' role: a password over TCP (Debian's pg_hba asks for scram on 127.0.0.1).
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN
    CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
  END IF;
END
\$\$;
SQL
if ! runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname = '$ROLE'" | grep -q 1; then
  runuser -u postgres -- createdb -O "$ROLE" "$ROLE"
fi
echo "ensure_postgres: PostgreSQL answers on $HOST:$PORT (role $ROLE)"
