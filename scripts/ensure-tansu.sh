#!/usr/bin/env bash
# Installs the pinned Kafka-API broker (tansu, in-memory "dynostore" storage) into a cache
# outside the clone, once. Idempotent: a warm cache returns at once.
#
# Why build from crates.io: it is the only registry this project may reach, and Debian's
# librdkafka-based tools (kcat) cannot talk to tansu. The build takes ~10 minutes cold.
set -euo pipefail

TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
CACHE="${TASKFLOW_CACHE:-/var/cache/taskflow}"
ROOT="$CACHE/tansu-$TANSU_VERSION"
BIN="$ROOT/bin/tansu"

if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$ROOT"
echo "ensure-tansu: building tansu $TANSU_VERSION (dynostore) into $ROOT; this takes ~10 minutes once" >&2
# A private target dir so an interrupted build resumes instead of starting over.
CARGO_TARGET_DIR="$CACHE/tansu-build" \
  cargo install --locked --quiet --version "$TANSU_VERSION" --features dynostore \
  --root "$ROOT" tansu >&2
echo "$BIN"
