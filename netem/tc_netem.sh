#!/usr/bin/env bash
# Apply / clear / show a netem link emulation qdisc on a network interface.
#
#   tc_netem.sh apply [IFACE]   tc qdisc replace dev IFACE root netem ...   (idempotent)
#   tc_netem.sh clear [IFACE]   remove the root qdisc (back to the kernel default)
#   tc_netem.sh show  [IFACE]   print the qdiscs of IFACE
#
# Configuration (environment):
#   DSD_LINK_DELAY_MS   one-way delay added to every packet leaving IFACE (ms)        default 0
#   DSD_LINK_JITTER_MS  uniform +- jitter on that delay (ms)                          default 0
#   DSD_LINK_LOSS_PCT   random packet loss (percent, 0-100)                           default 0
#   DSD_LINK_RATE       bandwidth, tc syntax: 100mbit, 1gbit, 500kbit, bare number = bit/s
#   DSD_LINK_IFACE      interface when none is given on the command line              default eth0
#   DSD_TC              tc binary                                                     default tc
#
# Exit codes: 0 ok (or nothing requested), 1 other tc failure, 2 usage / invalid value,
#             3 tc not installed, 4 no permission (needs CAP_NET_ADMIN),
#             5 kernel has no netem qdisc, 6 no such interface.
set -euo pipefail

prog=tc_netem.sh
die() { # die CODE MESSAGE...
    local code=$1
    shift
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit "$code"
}

usage() {
    printf 'usage: %s apply|clear|show [IFACE]   (configured by DSD_LINK_DELAY_MS, DSD_LINK_JITTER_MS,\n' "$prog"
    printf '       DSD_LINK_LOSS_PCT, DSD_LINK_RATE, DSD_LINK_IFACE; see the header of this script)\n'
}

# number NAME VALUE: check VALUE is a non-negative decimal number.
number() {
    [[ $2 =~ ^[0-9]+(\.[0-9]+)?$ ]] || die 2 "$1='$2' is not a valid number (expected e.g. 25 or 2.5)"
}

# nonzero VALUE: true when the (validated) number is > 0.
nonzero() { [[ $1 =~ [1-9] ]]; }

# run_tc ARGS...: run tc, translating its errors into clear messages and exit codes.
run_tc() {
    local out
    if out=$("$TC" "$@" 2>&1); then
        [[ -z $out ]] || printf '%s\n' "$out"
        return 0
    fi
    case $out in
    *"Operation not permitted"*)
        die 4 "no permission to change the qdisc of $iface (tc: $out). The process needs CAP_NET_ADMIN," \
            "e.g. 'docker run --cap-add NET_ADMIN'." ;;
    *"qdisc kind is unknown"* | *"Unknown qdisc"* | *"unknown qdisc"*)
        die 5 "this kernel has no netem qdisc (tc: $out). Load it on the host ('modprobe sch_netem'," \
            "package kernel-modules-extra / linux-modules-extra) or use the userspace emulator" \
            "(DSD_NETEM_FALLBACK=emulator)." ;;
    *"Cannot find device"*)
        die 6 "network interface '$iface' does not exist (set DSD_LINK_IFACE or pass IFACE)." ;;
    *)
        die 1 "'tc $*' failed: $out" ;;
    esac
}

cmd=${1:-}
case $cmd in
apply | clear | show) ;;
-h | --help | help)
    usage
    exit 0
    ;;
*)
    usage >&2
    exit 2
    ;;
esac
[[ $# -le 2 ]] || die 2 "too many arguments"
iface=${2:-${DSD_LINK_IFACE:-eth0}}
[[ $iface =~ ^[A-Za-z0-9_.:@-]+$ ]] || die 2 "invalid interface name '$iface'"

if [[ $cmd == apply ]]; then
    delay=${DSD_LINK_DELAY_MS:-0}
    jitter=${DSD_LINK_JITTER_MS:-0}
    loss=${DSD_LINK_LOSS_PCT:-0}
    rate=${DSD_LINK_RATE:-0}
    number DSD_LINK_DELAY_MS "$delay"
    number DSD_LINK_JITTER_MS "$jitter"
    number DSD_LINK_LOSS_PCT "$loss"
    [[ $loss =~ ^(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?)$ ]] || die 2 "DSD_LINK_LOSS_PCT='$loss' must be between 0 and 100"
    shopt -s nocasematch
    [[ $rate =~ ^[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)?$ ]] ||
        die 2 "DSD_LINK_RATE='$rate' is not a valid rate (expected e.g. 100mbit, 1gbit, 500kbit or bits/s)"
    shopt -u nocasematch
    [[ $rate =~ [a-zA-Z] ]] || rate="${rate}bit"

    netem_args=()
    if nonzero "$delay" || nonzero "$jitter"; then
        netem_args+=(delay "${delay}ms")
        if nonzero "$jitter"; then netem_args+=("${jitter}ms"); fi
    fi
    if nonzero "$loss"; then netem_args+=(loss "${loss}%"); fi
    if nonzero "${rate%%[a-zA-Z]*}"; then netem_args+=(rate "$rate"); fi

    if [[ ${#netem_args[@]} -eq 0 ]]; then
        echo "$prog: no link emulation requested (DSD_LINK_DELAY_MS/JITTER_MS/LOSS_PCT/RATE unset or 0); nothing to do"
        exit 0
    fi
fi

TC=${DSD_TC:-tc}
if ! command -v "$TC" >/dev/null 2>&1; then
    for dir in /usr/sbin /sbin; do
        if [[ $TC != */* && -x $dir/$TC ]]; then TC=$dir/$TC && break; fi
    done
fi
command -v "$TC" >/dev/null 2>&1 ||
    die 3 "'$TC' not found: install iproute2 (apt-get install iproute2 / apk add iproute2)."

case $cmd in
apply)
    run_tc qdisc replace dev "$iface" root netem "${netem_args[@]}"
    echo "$prog: $iface: netem ${netem_args[*]}"
    ;;
clear)
    if ! out=$("$TC" qdisc del dev "$iface" root 2>&1); then
        case $out in
        *"handle of zero"* | *"No such file or directory"* | *"Invalid handle"*)
            echo "$prog: $iface: no root qdisc to clear" ;;
        *) run_tc qdisc del dev "$iface" root ;; # re-run for the error translation
        esac
    else
        echo "$prog: $iface: cleared"
    fi
    ;;
show)
    run_tc qdisc show dev "$iface"
    ;;
esac
