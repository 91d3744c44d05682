#!/usr/bin/env bash
# Evaluates nixos/module.nix for real, with nixpkgs' lib and Debian's nix-instantiate
# (eval.nix, stubs.nix), for every case of cases.nix:
#   good*  must evaluate with no failed assertion; their units and /etc files are written to
#          $OUT/<case>/ (units rendered as NixOS renders them), `expectWarning` checked;
#   others must fail, with their `expect` text in the error.
# Then, for the `good` case:
#   - each daemon's generated TOML goes through the module's build-time check (the daemon's
#     --check-config with placeholder credentials), with target/debug binaries, when built;
#   - `systemd-analyze security --offline=true` scores each unit; any exposure above
#     $MAX_EXPOSURE (2.0) fails.
#
# NIXPKGS_LIB: a nixpkgs checkout, or a tree with nixpkgs' lib/ (default: the vendored copy,
# ../shared/vendor/nixpkgs-lib next to the repository). OUT: default target/nixos-eval.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
NIXPKGS_LIB="${NIXPKGS_LIB:-$root/../shared/vendor/nixpkgs-lib}"
OUT="${OUT:-$root/target/nixos-eval}"
MAX_EXPOSURE="${MAX_EXPOSURE:-2.0}"
BIN_DIR="${TASKFLOW_BIN_DIR:-$root/target/debug}"

fail() { printf 'nixos-eval: FAIL: %s\n' "$*" >&2; exit 1; }

command -v nix-instantiate >/dev/null || fail "nix-instantiate not found (apt-get install nix-bin; scripts/install-deps.sh installs it)"
command -v jq >/dev/null || fail "jq not found (scripts/install-deps.sh installs it)"
[ -f "$NIXPKGS_LIB/lib/default.nix" ] || fail "no nixpkgs lib at $NIXPKGS_LIB/lib (set NIXPKGS_LIB to a nixpkgs checkout or the vendored nixpkgs-lib)"
NIXPKGS_LIB="$(cd "$NIXPKGS_LIB" && pwd)"

evaluate() { # case -> JSON on stdout, error text on stderr
  # stderr goes through a file, not `2> >(grep …)`: a process substitution finishes on its
  # own time, so the caller could read the error file before grep had written it (the
  # cases failed at random "without" their message).
  local raw rc=0
  raw=$(mktemp)
  nix-instantiate --eval --strict --json "$here/eval.nix" \
    --arg lib "import $NIXPKGS_LIB/lib" --argstr case "$1" 2>"$raw" || rc=$?
  grep -v 'build-users-group' "$raw" >&2 || true
  rm -f "$raw"
  return "$rc"
}

cases=$(nix-instantiate --eval --strict --json --expr \
  "builtins.attrNames (import $here/cases.nix { lib = import $NIXPKGS_LIB/lib; })" 2>/dev/null | jq -r '.[]')
[ -n "$cases" ] || fail "cannot list tests/nixos-eval/cases.nix"

rm -rf "$OUT"
mkdir -p "$OUT"
failed=0
n_good=0
n_bad=0
for c in $cases; do
  meta=$(nix-instantiate --eval --strict --json --expr \
    "let c = (import $here/cases.nix { lib = import $NIXPKGS_LIB/lib; }).\"$c\"; in { expect = c.expect or null; warning = c.expectWarning or null; }" 2>/dev/null)
  expect=$(jq -r '.expect // empty' <<<"$meta")
  warning=$(jq -r '.warning // empty' <<<"$meta")
  err="$OUT/$c.err"
  if json=$(evaluate "$c" 2>"$err"); then
    if [ -n "$expect" ]; then
      echo "nixos-eval: FAIL $c: evaluated, but must fail with: $expect" >&2
      failed=$((failed + 1))
      continue
    fi
    dir="$OUT/$c"
    mkdir -p "$dir/units" "$dir/etc"
    jq -r '.units | keys[]' <<<"$json" | while read -r u; do
      jq -r --arg u "$u" '.units[$u]' <<<"$json" >"$dir/units/$u"
    done
    jq -r '.etc | keys[]' <<<"$json" | while read -r e; do
      mkdir -p "$dir/etc/$(dirname "$e")"
      jq -r --arg e "$e" '.etc[$e]' <<<"$json" >"$dir/etc/$e"
    done
    jq '{warnings, firewall, checks}' <<<"$json" >"$dir/meta.json"
    nunits=$(jq '.units | length' <<<"$json")
    if [ "$nunits" -ne 4 ]; then
      echo "nixos-eval: FAIL $c: expected the 4 daemons' units, got $nunits" >&2
      failed=$((failed + 1))
      continue
    fi
    if [ -n "$warning" ] && ! jq -e --arg w "$warning" 'any(.warnings[]; contains($w))' <<<"$json" >/dev/null; then
      echo "nixos-eval: FAIL $c: no warning containing: $warning (got: $(jq -c .warnings <<<"$json"))" >&2
      failed=$((failed + 1))
      continue
    fi
    if [ -z "$warning" ] && [ "$(jq '.warnings | length' <<<"$json")" -ne 0 ]; then
      echo "nixos-eval: FAIL $c: unexpected warnings: $(jq -c .warnings <<<"$json")" >&2
      failed=$((failed + 1))
      continue
    fi
    echo "nixos-eval: ok $c (evaluates; $nunits units, firewall $(jq -c .firewall <<<"$json"))"
    n_good=$((n_good + 1))
  else
    if [ -z "$expect" ]; then
      echo "nixos-eval: FAIL $c: must evaluate, but:" >&2
      cat "$err" >&2
      failed=$((failed + 1))
    elif ! tr -s ' \n' ' ' <"$err" | grep -qF -- "$(tr -s ' \n' ' ' <<<"$expect" | sed 's/ $//')"; then
      echo "nixos-eval: FAIL $c: failed, but without: $expect" >&2
      cat "$err" >&2
      failed=$((failed + 1))
    else
      echo "nixos-eval: ok $c (refused: $(grep -m1 -E 'Failed assertions|error:' -A2 "$err" | tr -s ' \n' ' ' | cut -c1-150)…)"
      n_bad=$((n_bad + 1))
    fi
  fi
done
[ "$failed" -eq 0 ] || fail "$failed case(s) failed"

good="$OUT/good"

# The module's build-time check (its runCommand), run for real with our binaries.
if [ -x "$BIN_DIR/taskflow-gateway" ]; then
  for e in gateway auth notify shard-proxy; do
    creds=$(mktemp -d)
    jq -r --arg e "taskflow/$e.toml" '.checks[$e]' "$good/meta.json" \
      | grep -oE '^touch "\$CREDENTIALS_DIRECTORY"/.*' | sed 's/^touch "$CREDENTIALS_DIRECTORY"\///' \
      | while read -r n; do touch "$creds/$(eval echo "$n")"; done
    if ! out=$(CREDENTIALS_DIRECTORY="$creds" "$BIN_DIR/taskflow-$e" --check-config --config "$good/etc/taskflow/$e.toml" 2>&1); then
      rm -rf "$creds"
      fail "taskflow-$e --check-config refuses the module's $good/etc/taskflow/$e.toml: $out"
    fi
    rm -rf "$creds"
  done
  echo "nixos-eval: ok the daemons accept the generated TOML (--check-config, as the module's build step)"
else
  fail "no $BIN_DIR/taskflow-gateway: build the daemons first (cargo build --workspace --bins)"
fi

# Hardening, scored the way `systemd-analyze security` scores a running unit.
command -v systemd-analyze >/dev/null || fail "systemd-analyze not found"
worst=0
for u in "$good"/units/*.service; do
  name=$(basename "$u")
  # --offline reads the file; the unit is scored as written (no drop-ins of this host).
  report=$(systemd-analyze security --offline=true --no-pager "$u" 2>&1 || true)
  score=$(grep -oE 'Overall exposure level for .*: [0-9]+\.[0-9]+' <<<"$report" | grep -oE '[0-9]+\.[0-9]+$' || true)
  if [ -z "$score" ]; then
    echo "$report" >&2
    fail "systemd-analyze gave no exposure score for $name"
  fi
  printf 'nixos-eval: exposure %s %s\n' "$score" "$name"
  echo "$report" >"$OUT/security-$name.txt"
  if awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
    grep -E '^✗' "$OUT/security-$name.txt" >&2 || true
    worst=1
  fi
done
[ "$worst" -eq 0 ] || fail "exposure above $MAX_EXPOSURE (reports in $OUT/security-*.txt)"
echo "nixos-eval: $n_good good and $n_bad bad configurations as expected; every exposure <= $MAX_EXPOSURE; units in $good/units"
