#!/usr/bin/env bash
# Syntax-checks every Nix file of the repository, tracked or not yet tracked (ignored files
# and target/ excluded), with `nix-instantiate --parse`: the most that can be checked on a
# machine without nixpkgs or network (Debian's nix-bin; see scripts/install-deps.sh). When
# nixfmt or statix happen to be on PATH (e.g. in `nix develop`), they run too; otherwise they
# are skipped without a word. Exit status: non-zero if any check failed.
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"

if ! command -v nix-instantiate >/dev/null 2>&1; then
  echo "check-nix: nix-instantiate not found (Debian: apt-get install nix-bin; or run scripts/install-deps.sh)" >&2
  exit 1
fi

# Tracked plus untracked-but-not-ignored, so a new file is checked before its first commit.
mapfile -d '' candidates < <(git ls-files -z --cached --others --exclude-standard -- '*.nix' ':(exclude)target/**')

files=()
for f in "${candidates[@]}"; do
  # A tracked file deleted in the work tree is still listed by --cached.
  [ -f "$f" ] && files+=("$f")
done

if [ ${#files[@]} -eq 0 ]; then
  echo "check-nix: no .nix files"
  exit 0
fi

failed=0
err=$(mktemp)
trap 'rm -f "$err"' EXIT

for f in "${files[@]}"; do
  if ! nix-instantiate --parse "$f" >/dev/null 2>"$err"; then
    echo "check-nix: parse error in $f:" >&2
    # Debian's nix warns about its missing build group on every call; that is noise here.
    grep -v "build-users-group" "$err" >&2 || true
    failed=$((failed + 1))
  fi
done

extra=""
if command -v nixfmt >/dev/null 2>&1; then
  if ! nixfmt --check "${files[@]}"; then
    echo "check-nix: nixfmt would reformat the files above (run: nix fmt)" >&2
    failed=$((failed + 1))
  fi
  extra+=", nixfmt"
fi
if command -v statix >/dev/null 2>&1; then
  for f in "${files[@]}"; do
    if ! statix check "$f"; then
      failed=$((failed + 1))
    fi
  done
  extra+=", statix"
fi

if [ "$failed" -ne 0 ]; then
  echo "check-nix: ${#files[@]} files, $failed failed (parse$extra)" >&2
  exit 1
fi
echo "check-nix: ${#files[@]} files ok (parse$extra)"
