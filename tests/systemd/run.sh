#!/usr/bin/env bash
# The units nixos/module.nix generates, under real systemd: boots a throwaway Debian bookworm
# VM (tests/systemd/image.sh; qemu, systemd as PID 1, PostgreSQL and Redis from Debian, our
# broker and a python SMTP sink), installs our daemons with the units and TOML files rendered
# by tests/nixos-eval (only /nix/store paths rewritten), and runs tests/systemd/guest.sh in it:
# READY=1 before active with a STATUS= text, LoadCredential secrets, register/login/task/email
# end to end, structured journal fields, reload without dropped sessions, the watchdog,
# exit 78 without a restart loop, STOPPING=1 and clean stops. One boot; the guest powers off.
#
# Fails, saying what is missing, when qemu, the image or the binaries are not there: never
# skipped. Acceleration: KVM only when /dev/kvm is usable *and* the CPU advertises vmx/svm
# (nested setups expose /dev/kvm without them, and a KVM guest then hangs); TCG otherwise.
# TASKFLOW_VM_ACCEL=kvm|tcg overrides.
#
# Env: TASKFLOW_BIN_DIR (default target/debug), TASKFLOW_VM_TIMEOUT (s, default 1800),
# OUT (default target/systemd-vm).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
CACHE="${TASKFLOW_CACHE:-/var/cache/taskflow}"
BIN_DIR="${TASKFLOW_BIN_DIR:-$root/target/debug}"
OUT="${OUT:-$root/target/systemd-vm}"
TIMEOUT="${TASKFLOW_VM_TIMEOUT:-1800}"
EVAL_OUT="$root/target/nixos-eval"

fail() { printf 'systemd-vm: FAIL: %s\n' "$*" >&2; exit 1; }
log() { printf 'systemd-vm: %s\n' "$*"; }
start=$(date +%s)

# ---- what it needs --------------------------------------------------------------------------
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 is missing (apt-get install qemu-system-x86; scripts/install-deps.sh does)"
for b in taskflow-gateway taskflow-auth taskflow-notify taskflow-shard-proxy; do
  [ -x "$BIN_DIR/$b" ] || fail "$BIN_DIR/$b is missing (cargo build --workspace --bins)"
done
TANSU_BIN="${TASKFLOW_TANSU_BIN:-$(ls "$CACHE"/tansu-*/bin/tansu 2>/dev/null | tail -1)}"
[ -x "$TANSU_BIN" ] || fail "the broker (tansu) is missing under $CACHE/tansu-*/bin (scripts/ensure-tansu.sh)"
# The units come from tests/nixos-eval (make test runs it just before); rendered again when
# missing or older than the module or the harness.
rendered="$EVAL_OUT/good/units/taskflow-gateway.service"
if [ ! -f "$rendered" ] || [ -n "$(find "$root/nixos" "$root/tests/nixos-eval" -newer "$rendered" -type f)" ]; then
  "$root/tests/nixos-eval/run.sh" >/dev/null || fail "rendering the units (tests/nixos-eval/run.sh) failed"
fi
image="$("$here/image.sh")" || fail "no VM image (tests/systemd/image.sh failed, see above)"
for f in vmlinuz initrd.img rootfs.raw; do
  [ -f "$image/$f" ] || fail "$image/$f is missing"
done

accel="${TASKFLOW_VM_ACCEL:-}"
if [ -z "$accel" ]; then
  accel=tcg
  if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm; fi
fi

# ---- the share: binaries, units, configuration, secrets, the check script ---------------------
rm -rf "$OUT"
share="$OUT/share"
mkdir -p "$share/bin" "$share/units" "$share/etc/taskflow" "$share/secrets" "$share/guest" "$share/out"
# Debug info stripped: the debug builds are 100-300 MB each, most of it DWARF that 9p under
# emulation would copy for nothing (symbols stay, for backtraces).
for b in "$BIN_DIR"/taskflow-{gateway,auth,notify,shard-proxy} "$TANSU_BIN"; do
  objcopy --strip-debug "$b" "$share/bin/$(basename "$b")"
done
cp "$EVAL_OUT/good/etc/taskflow/"*.toml "$share/etc/taskflow/"
cp "$here/guest.sh" "$share/guest/run.sh"
# Store paths -> where Debian has the same programs: our package -> /usr/local (the daemons
# are installed in /usr/local/bin), nixpkgs' coreutils/findutils/grep/sed/systemd -> /usr.
# The X-*-Triggers lines (switch-to-configuration bookkeeping, ignored by systemd) keep theirs.
for u in "$EVAL_OUT"/good/units/*.service; do
  sed -E \
    -e '/^X-(Restart|Reload)-Triggers=/b' \
    -e 's#/nix/store/[a-z0-9]{32}-taskflow-[0-9][^/"]*#/usr/local#g' \
    -e 's#/nix/store/[a-z0-9]{32}-(coreutils|findutils|gnugrep|gnused|systemd)-[0-9][^/"]*#/usr#g' \
    "$u" >"$share/units/$(basename "$u")"
done
if left=$(grep -H '/nix/store' "$share"/units/*.service | grep -v ':X-\(Restart\|Reload\)-Triggers='); then
  fail "store paths left in the units after rewriting: $left"
fi
printf taskflow >"$share/secrets/pg-password"
openssl genpkey -algorithm ed25519 -out "$share/secrets/jwt-private.pem" 2>/dev/null
openssl pkey -in "$share/secrets/jwt-private.pem" -pubout -out "$share/secrets/jwt-public.pem" 2>/dev/null

# ---- boot --------------------------------------------------------------------------------------
log "booting $image (accel $accel, timeout ${TIMEOUT}s); console in $OUT/console.log"
boot=$(date +%s)
rc=0
timeout "$TIMEOUT" qemu-system-x86_64 \
  -machine q35 -accel "$accel" -cpu max -smp 2 -m 2048 \
  -display none -monitor none -serial "file:$OUT/console.log" -no-reboot \
  -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=false" \
  -drive "file=$image/rootfs.raw,format=raw,if=virtio,snapshot=on" \
  -virtfs "local,path=$share,mount_tag=taskflow,security_model=none,id=taskflow" \
  -nic none || rc=$?
vm_secs=$(($(date +%s) - boot))

if [ -f "$share/out/results.txt" ]; then
  sed 's/^/  /' "$share/out/results.txt"
fi
[ "$rc" -ne 124 ] || fail "the VM did not power off within ${TIMEOUT}s (console: $OUT/console.log; tail below)$(echo; tail -20 "$OUT/console.log")"
[ "$rc" -eq 0 ] || fail "qemu exited with $rc (console: $OUT/console.log)$(echo; tail -20 "$OUT/console.log")"
[ -f "$share/out/rc" ] || fail "the guest wrote no result (console: $OUT/console.log)$(echo; tail -30 "$OUT/console.log")"
n_ok=$(grep -c '^\[[0-9]*s\] ok ' "$share/out/results.txt" || true)
n_fail=$(cat "$share/out/rc")
[ "$n_fail" = 0 ] || fail "$n_fail check(s) failed in the guest (journal: $share/out/journal.txt)"
[ "$n_ok" -ge 30 ] || fail "only $n_ok checks passed; the guest script stopped early? (journal: $share/out/journal.txt)"
log "ok: $n_ok checks passed under systemd in the VM (boot + checks ${vm_secs}s, total $(($(date +%s) - start))s, accel $accel)"
