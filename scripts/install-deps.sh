#!/usr/bin/env bash
# Installs what building, testing and running TaskFlow locally needs on Debian/Ubuntu, and
# nothing that is already there. Idempotent; safe to run before every `make test`/`make dev`.
#
#   apt:  PostgreSQL 15 server + client (initdb, pg_ctl, psql, pgbench), redis-server,
#         pgbouncer and valgrind (benchmarks only), nix-bin (nix-instantiate: parsing our .nix files and
#         evaluating the NixOS module, tests/nixos-eval), jq, build tools for rdkafka's
#         bundled librdkafka; qemu-system-x86 and mmdebstrap for the real-systemd VM test
#         (tests/systemd; its image is built on first use, not here).
#   npm:  maildev (SMTP sink with a web UI and a REST API the tests read mail from).
#   cargo: tansu, the Kafka-API broker (scripts/ensure-tansu.sh).
#
# Packages are installed with their services held down (policy-rc.d): the stack and the
# tests start their own servers on their own ports, and a distro redis on 6379 or pgbouncer
# on 6432 would collide with them.
set -euo pipefail

CACHE="${TASKFLOW_CACHE:-/var/cache/taskflow}"
APT_PACKAGES=(postgresql-15 postgresql-client-15 redis-server pgbouncer nix-bin
              build-essential cmake pkg-config libssl-dev zlib1g-dev libsasl2-dev
              curl wrk openssl python3-venv libcurl4-openssl-dev
              jq mmdebstrap e2fsprogs qemu-system-x86 valgrind)
MAILDEV_VERSION="${MAILDEV_VERSION:-3.0.0}"

log() { printf 'install-deps: %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    sudo=""
    command -v sudo >/dev/null && sudo="sudo "
    log "missing packages; run:"
    echo "  ${sudo}apt-get update && ${sudo}apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  log "apt-get install ${missing[*]}"
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; own_policy=1
  fi
  trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
  export DEBIAN_FRONTEND=noninteractive
  # bookworm's qemu-system-x86 (7.2) cannot be installed next to a backports qemu-utils
  # (10.x, "Breaks: qemu-system-common (<< 8)"), which some machine images carry: take qemu
  # from bookworm-backports then, to match.
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] \
    && dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '~bpo12'; then
    bpo=/etc/apt/sources.list.d/taskflow-bookworm-backports.sources
    if [ ! -f "$bpo" ]; then
      log "qemu-utils comes from bookworm-backports here: adding that suite for qemu-system-x86"
      printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >"$bpo"
    fi
    # Installed on its own with the suite as target release, so that its dependencies
    # (qemu-system-common/-data, seabios) come from backports too.
    backports_qemu=1
    missing=("${missing[@]/qemu-system-x86}")
  fi
  apt-get update -qq
  rest=()
  for p in "${missing[@]}"; do [ -n "$p" ] && rest+=("$p"); done
  if [ ${#rest[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${rest[@]}" >/dev/null
  fi
  if [ "${backports_qemu:-0}" = 1 ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  fi
fi

# maildev from npm, into the cache (not the clone).
MAILDEV_ROOT="$CACHE/maildev-$MAILDEV_VERSION"
if [ ! -x "$MAILDEV_ROOT/node_modules/.bin/maildev" ]; then
  command -v npm >/dev/null || { log "npm is missing: apt-get install -y nodejs npm"; exit 1; }
  log "npm install maildev@$MAILDEV_VERSION into $MAILDEV_ROOT"
  mkdir -p "$MAILDEV_ROOT"
  npm install --silent --no-audit --no-fund --prefix "$MAILDEV_ROOT" "maildev@$MAILDEV_VERSION" >/dev/null
fi

[ "${SKIP_TANSU:-0}" = 1 ] || "$(dirname "$0")/ensure-tansu.sh" >/dev/null
log "ok"
