#!/usr/bin/env bash
# Makes sure what the tests use is installed and running on this machine:
# PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379, with the role the
# PostgreSQL tests log in as (password auth from 127.0.0.1, so a wrong
# password really fails), Debian's Chromium for the browser test, and Debian's
# aiosmtpd for the mail tests, and promtool for the metrics test.
# Idempotent; installs with apt-get when root.
set -euo pipefail

PG_ROLE=dockerflow_sidecar
PG_PASSWORD=dockerflow_sidecar
DEADLINE=30 # seconds a service gets to come up

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

wait_for() {
    local what=$1; shift
    local end=$((SECONDS + DEADLINE))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "$what did not come up within ${DEADLINE}s"
        sleep 0.2
    done
}

# --- PostgreSQL ----------------------------------------------------------
command -v pg_ctlcluster >/dev/null || { log "installing PostgreSQL"; apt_install postgresql postgresql-client; }
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for "PostgreSQL" pg_isready -q -h 127.0.0.1 -p 5432
fi
psql_admin() { as_root runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "$@"; }
psql_admin -c "DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN
    CREATE ROLE $PG_ROLE LOGIN PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_ROLE LOGIN PASSWORD '$PG_PASSWORD';
  END IF;
END \$\$;"
hba=$(psql_admin -t -A -c "SHOW hba_file")
rule="host all $PG_ROLE 127.0.0.1/32 scram-sha-256"
if ! as_root grep -qxF "$rule" "$hba"; then
    log "requiring a password for $PG_ROLE in $hba"
    as_root sed -i "1i $rule" "$hba"
    psql_admin -c "SELECT pg_reload_conf()" >/dev/null
fi

# --- Redis ---------------------------------------------------------------
command -v redis-server >/dev/null || { log "installing Redis"; apt_install redis-server redis-tools; }
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting Redis"
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /tmp --logfile /tmp/redis-dockerflow-sidecar.log
    wait_for "Redis" redis-cli -h 127.0.0.1 -p 6379 ping
fi
# --- Chromium (tests/browser.rs) -------------------------------------------
command -v chromium >/dev/null || { log "installing Chromium"; apt_install chromium; }
# --- an SMTP server (tests/mail.rs runs tests/smtp_server.py with it) ----------
# Debian's python3 and its aiosmtpd: /usr/bin/python3, whatever python3 is first on PATH.
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || { log "installing aiosmtpd"; apt_install python3 python3-aiosmtpd; }
# --- promtool (tests/metrics.rs checks /metrics with it) ---------------------
command -v promtool >/dev/null || { log "installing promtool (Debian's prometheus)"; apt_install prometheus; }
log "PostgreSQL, Redis, Chromium, aiosmtpd and promtool are ready"
