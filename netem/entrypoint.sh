#!/usr/bin/env bash
# Container entrypoint: apply the link emulation requested in the environment, then exec "$@".
#
#   entrypoint.sh COMMAND [ARGS...]
#
# Link settings: DSD_LINK_DELAY_MS, DSD_LINK_JITTER_MS, DSD_LINK_LOSS_PCT, DSD_LINK_RATE,
# DSD_LINK_IFACE (see tc_netem.sh). If they ask for emulation but netem cannot be applied (no tc,
# no CAP_NET_ADMIN, kernel without the netem qdisc), DSD_NETEM_FALLBACK decides:
#   fail      (default) print why and exit non-zero: never run silently without the requested link
#   emulator  run COMMAND anyway with DSD_LINK_EMULATOR=1 exported (DSD_LINK_* kept), so `compose exec`
#             runs dsd-node behind the userspace emulator (netem/emulated_node.py)
# With nothing requested, COMMAND is exec'd directly. DSD_LINK_EMULATOR=1 set on entry skips tc
# (the userspace emulator was chosen explicitly; applying both would double the delay).
set -euo pipefail

prog=entrypoint.sh
err() { printf '%s: error: %s\n' "$prog" "$*" >&2; }

[[ $# -gt 0 ]] || {
    err "no command given (usage: $prog COMMAND [ARGS...])"
    exit 2
}

fallback=${DSD_NETEM_FALLBACK:-fail}
case $fallback in
fail | emulator) ;;
*)
    err "DSD_NETEM_FALLBACK='$fallback' is invalid (expected 'fail' or 'emulator')"
    exit 2
    ;;
esac

if [[ ${DSD_LINK_EMULATOR:-0} == 1 ]]; then # explicitly asked for the userspace emulator: no tc too
    echo "$prog: DSD_LINK_EMULATOR=1: using the userspace link emulator, not touching tc" >&2
    exec "$@"
fi

tc_netem=${DSD_TC_NETEM:-$(dirname -- "${BASH_SOURCE[0]}")/tc_netem.sh}
rc=0
bash "$tc_netem" apply >&2 || rc=$? # stdout stays the command's own

case $rc in
0) ;;
3 | 4 | 5) # tc missing / no NET_ADMIN / no netem qdisc: the link cannot be emulated by the kernel
    requested="delay=${DSD_LINK_DELAY_MS:-0}ms jitter=${DSD_LINK_JITTER_MS:-0}ms loss=${DSD_LINK_LOSS_PCT:-0}%"
    requested+=" rate=${DSD_LINK_RATE:-unlimited}"
    if [[ $fallback == emulator ]]; then
        echo "$prog: netem unavailable; falling back to the userspace link emulator ($requested)" >&2
        if [[ ${DSD_LINK_LOSS_PCT:-0} =~ [1-9] ]]; then
            echo "$prog: warning: the userspace emulator does not emulate packet loss" >&2
        fi
        export DSD_LINK_EMULATOR=1
    else
        err "link emulation was requested ($requested) but netem cannot be applied (see above);" \
            "refusing to run without it. Run with --cap-add NET_ADMIN on a kernel with sch_netem, or set" \
            "DSD_NETEM_FALLBACK=emulator to use the userspace link emulator."
        exit "$rc"
    fi
    ;;
*) # invalid settings, unknown interface, other tc failures: always fatal
    err "could not apply the requested link emulation (tc_netem.sh exit code $rc, see above)"
    exit "$rc"
    ;;
esac

exec "$@"
