#!/usr/bin/env bash
# Install what the distributed deployment test (make test-distributed) needs from Debian: PostgreSQL (initdb,
# pg_ctl, pg_dump under /usr/lib/postgresql/*/bin) and redis-server. The test starts its own throwaway
# servers on loopback; the packages' own services are neither needed nor used.
#
# Usage: scripts/install_distributed.sh
# Needs root for apt-get (CI and the dev machines run as root). Idempotent: skips what is already there.
set -euo pipefail

need=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != "0" ]; then
        echo "install_distributed: ${need[*]} missing and this is not root; install them, or the test is skipped" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

ls -d /usr/lib/postgresql/*/bin | tail -1
redis-server --version
