#!/usr/bin/env bash
# The Docker testnet end to end: engine, image, `compose up`, health, one generation, teardown.
#
#   tools/compose_check.sh            # exit 0: the text through the compose network equals `dsd generate --local`
#
# 1. A Docker engine: uses a running one; otherwise (as root, with apt-get) installs docker.io and
#    docker-compose and starts dockerd in the background (log: $WORK/dockerd.log), stopped again at the end.
# 2. The base image: $BASE_IMAGE if set; else python:3.11-slim if present or pullable; else (no registry reachable)
#    dsd-base:bookworm, built with debootstrap from the Debian mirror apt already uses and `docker import`.
# 3. The dsd image (dsd-node:local) with BuildKit. The CPU torch wheel is put in wheels/ (pip's find-links in the
#    build; ignored by git), from pip's configured find-links, else from $TORCH_INDEX_URL (default: the CPU index).
# 4. `compose up` of docker-compose.yml as project $PROJECT (compose v2 or docker-compose 1.29), with every node
#    behind a DSD_LINK_DELAY_MS=$DELAY_MS link (netem, or the userspace emulator where the kernel has no netem:
#    DSD_NETEM_FALLBACK=emulator); waits until all six nodes are healthy.
# 5. Generates "$PROMPT" through the `client` service and compares the text with `dsd generate --local` (greedy)
#    run in the same image; checks the link emulation the entrypoint chose, and that it refuses a delay it cannot
#    apply when no fallback is allowed.
# 6. Tears down the project's containers, network and volumes (images and the build cache stay).
#
# Environment: BASE_IMAGE, PROMPT (default "def fibonacci(n):"), DELAY_MS (default 10), PROJECT (default
# dsdcheck), HEALTH_TIMEOUT_S (default 600), WORK (default /tmp/dsd-docker: logs, rootfs), KEEP_ENGINE=1 (leave a
# dockerd this script started running), TORCH_INDEX_URL.
# Exit codes: 0 ok, 1 a check failed, 77 no Docker engine can run here (tests/test_docker.py skips).
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

PROMPT=${PROMPT:-"def fibonacci(n):"}
DELAY_MS=${DELAY_MS:-10}
PROJECT=${PROJECT:-dsdcheck}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-600}
WORK=${WORK:-/tmp/dsd-docker}
IMAGE=dsd-node:local
NODES=(bootstrap stage0 stage1 stage2 stage3 gateway)
mkdir -p "$WORK"

t_start=$(date +%s)
say() { printf 'compose_check: %s\n' "$*" >&2; }
fail() {
    say "FAILED: $*"
    exit 1
}
skip() {
    say "SKIP: $*"
    exit 77
}
since() { echo $(($(date +%s) - $1)); }

# --- 1. engine -------------------------------------------------------------------------------------------------
# The client: one with BuildKit usable, i.e. with the buildx plugin, or older than 23 (BuildKit built in, e.g.
# Debian's docker.io 20.10). A newer client without buildx refuses DOCKER_BUILDKIT=1.
pick_docker() {
    local c v
    for c in /usr/bin/docker "$(command -v docker 2>/dev/null || true)"; do
        [[ -n $c && -x $c ]] || continue
        if "$c" buildx version >/dev/null 2>&1; then
            echo "$c" && return 0
        fi
        v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || "$c" --version | sed -n 's/.*version \([0-9]*\).*/\1/p')
        if [[ ${v%%.*} =~ ^[0-9]+$ ]] && ((${v%%.*} < 23)); then
            echo "$c" && return 0
        fi
    done
    return 1
}
can_install() { [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; }
apt_install() {
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >"$WORK/apt.log" 2>&1 ||
        { apt-get update >>"$WORK/apt.log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1; }
}

have_engine() { [[ -n $docker ]] && { "$docker" info >/dev/null 2>&1 || command -v dockerd >/dev/null || [[ -x /usr/sbin/dockerd ]]; }; }
docker=$(pick_docker || true)
if ! have_engine; then
    can_install || skip "no usable docker client/engine, and not root with apt-get to install docker.io"
    apt_install docker.io || skip "apt-get install docker.io failed (see $WORK/apt.log)"
    docker=$(pick_docker) || skip "no docker client with BuildKit"
fi
export DOCKER_BUILDKIT=1
started_engine=""
if ! "$docker" info >/dev/null 2>&1; then
    dockerd_bin=$(command -v dockerd || echo /usr/sbin/dockerd)
    [[ $(id -u) == 0 && -x $dockerd_bin ]] || skip "the Docker engine is not running and cannot be started here"
    say "starting dockerd (log: $WORK/dockerd.log)"
    "$dockerd_bin" --exec-opt native.cgroupdriver=cgroupfs --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
    started_engine=$!
    for _ in $(seq 60); do
        "$docker" info >/dev/null 2>&1 && break
        kill -0 "$started_engine" 2>/dev/null || skip "dockerd exited: $(tail -3 "$WORK/dockerd.log")"
        sleep 1
    done
    "$docker" info >/dev/null 2>&1 || skip "dockerd did not come up in 60 s (see $WORK/dockerd.log)"
fi
if "$docker" compose version >/dev/null 2>&1; then
    compose_cmd=("$docker" compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
else
    can_install && apt_install docker-compose || skip "neither 'docker compose' nor docker-compose is installed"
    compose_cmd=(docker-compose)
fi
say "engine $("$docker" version --format '{{.Server.Version}}'), client $docker, compose: ${compose_cmd[*]}"

# --- 2. base image ---------------------------------------------------------------------------------------------
t0=$(date +%s)
base=${BASE_IMAGE:-}
if [[ -z $base ]]; then
    if "$docker" image inspect python:3.11-slim >/dev/null 2>&1 ||
        timeout 60 "$docker" pull -q python:3.11-slim >/dev/null 2>&1; then
        base=python:3.11-slim
    else
        base=dsd-base:bookworm
        if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
            say "no registry reachable: building $base with debootstrap"
            command -v debootstrap >/dev/null || { can_install && apt_install debootstrap; } ||
                fail "debootstrap is needed to build a base image without a registry"
            mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
            [[ -n $mirror ]] || mirror=$(sed -n 's/^deb \(http[^ ]*debian\)\/* .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -1)
            mirror=${mirror:-http://deb.debian.org/debian}
            rootfs=$WORK/rootfs
            rm -rf "$rootfs"
            debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
                bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
                fail "debootstrap failed (see $WORK/debootstrap.log)"
            rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
            tar -C "$rootfs" -c . | "$docker" import \
                --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
            rm -rf "$rootfs"
        fi
    fi
fi
t_base=$(since "$t0")
say "base image $base (${t_base} s)"

# --- 3. dsd image ----------------------------------------------------------------------------------------------
t0=$(date +%s)
torch_req=$(sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
pyver=$("$docker" run --rm --entrypoint python3 "$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p wheels
build_args=(--build-arg "BASE_IMAGE=$base")
if ! compgen -G "wheels/torch-${torch_req#torch==}*-cp${pyver/./}-*.whl" >/dev/null; then
    host_py=$(command -v python3 || true)
    if [[ -n $host_py ]] && [[ $("$host_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') == "$pyver" ]]; then
        # pip's configured find-links first (no download), then the CPU index
        "$host_py" -m pip download -q --no-deps --no-index -d wheels "$torch_req" 2>/dev/null ||
            "$host_py" -m pip download -q --no-deps -d wheels --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
                "$torch_req" || say "no $torch_req wheel for the build context; the build downloads one"
    fi
fi
if compgen -G "wheels/torch-${torch_req#torch==}*-cp${pyver/./}-*.whl" >/dev/null; then
    build_args+=(--build-arg TORCH_INDEX_URL=) # the wheel in wheels/ (find-links) rather than an index
    say "torch from $(basename wheels/torch-*-cp"${pyver/./}"-*.whl)"
fi
# pip's own CA bundle (a TLS-intercepting proxy's CA) for pip inside the build, as a secret (not in the image)
pip_cert=${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | head -1)}
[[ -n $pip_cert && -s $pip_cert ]] && build_args+=(--secret "id=pip_cert,src=$pip_cert")
"$docker" build --progress=plain -t "$IMAGE" "${build_args[@]}" . >"$WORK/build.log" 2>&1 ||
    fail "docker build failed: $(tail -30 "$WORK/build.log")"
t_image=$(since "$t0")
say "image $IMAGE built (${t_image} s; $("$docker" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

# --- 4. compose up ---------------------------------------------------------------------------------------------
gateway_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DSD_LINK_DELAY_MS=$DELAY_MS DSD_NETEM_FALLBACK=emulator DSD_GATEWAY_PORT=$gateway_port
compose() { "${compose_cmd[@]}" -p "$PROJECT" -f docker-compose.yml "$@"; }
cleanup() {
    local rc=$?
    if [[ $rc != 0 && $rc != 77 ]] && [[ -n ${compose_up:-} ]]; then
        compose logs --no-color --tail 40 >&2 2>/dev/null || true
    fi
    if [[ -n ${compose_up:-} ]]; then
        say "tearing down project $PROJECT (containers, network, volumes)"
        compose --profile client down -v --remove-orphans --timeout 5 >/dev/null 2>&1 ||
            compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    fi
    if [[ -n $started_engine && ${KEEP_ENGINE:-0} != 1 ]]; then
        kill "$started_engine" 2>/dev/null && wait "$started_engine" 2>/dev/null || true
    fi
    say "total $(since "$t_start") s, exit $rc"
}
trap cleanup EXIT

t0=$(date +%s)
compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true # leftovers of an interrupted run
compose_up=1
compose up -d --no-build >"$WORK/up.log" 2>&1 || fail "compose up failed: $(tail -20 "$WORK/up.log")"
deadline=$((t0 + HEALTH_TIMEOUT_S))
while :; do
    states=()
    for svc in "${NODES[@]}"; do
        id=$(compose ps -q "$svc" 2>/dev/null | head -1)
        states+=("$svc=$([[ -n $id ]] && "$docker" inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" || echo missing)")
    done
    [[ " ${states[*]} " != *"/"[!h]* && " ${states[*]} " != *missing* ]] && break
    [[ " ${states[*]} " == *unhealthy* || " ${states[*]} " == *exited* ]] && fail "a node failed: ${states[*]}"
    (($(date +%s) < deadline)) || fail "not all healthy after ${HEALTH_TIMEOUT_S} s: ${states[*]}"
    sleep 2
done
t_healthy=$(since "$t0")
say "all ${#NODES[@]} nodes healthy (${t_healthy} s after compose up)"

# --- 5. checks -------------------------------------------------------------------------------------------------
text_of() { python3 -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["text"], end="")'; }
t0=$(date +%s)
net_json=$(compose run --rm --no-deps -T client dsd generate --gateway gateway:6000 --json "$PROMPT" 2>"$WORK/client.err") ||
    fail "client generate failed: $(tail -20 "$WORK/client.err")"
t_gen=$(since "$t0")
net_text=$(text_of <<<"$net_json")
local_json=$("$docker" run --rm --network none "$IMAGE" dsd generate --local --json "$PROMPT" 2>"$WORK/local.err") ||
    fail "dsd generate --local failed: $(tail -20 "$WORK/local.err")"
local_text=$(text_of <<<"$local_json")
say "generated through the compose network (${t_gen} s incl. container start): $(python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$net_text")"
say "stats: $(python3 -c 'import json, sys; s=json.loads(sys.argv[1])["stats"]; print({k: s[k] for k in ("rounds", "accepted_per_round", "ms_per_token", "tokens_per_s") if k in s})' "${net_json##*$'\n'}")"
[[ $net_text == "$local_text" ]] ||
    fail "the network's text differs from dsd generate --local: $(printf '%q' "$net_text") != $(printf '%q' "$local_text")"
say "OK: identical to dsd generate --local (greedy)"

# Link emulation: netem where the kernel has it, else the userspace emulator (the node's PID 1 chain runs
# python -m netem.emulated_node).
if ((DELAY_MS > 0)); then
    logs=$(compose logs --no-color stage1 2>&1)
    if [[ $logs == *"falling back to the userspace link emulator"* ]]; then
        cmdline=$(compose exec -T stage1 sh -c 'tr "\0" " " </proc/1/cmdline' 2>&1 || true)
        [[ $cmdline == *netem.emulated_node* ]] || fail "stage1 fell back to the emulator but runs: $cmdline"
        say "link: no netem here; the entrypoint fell back to the userspace emulator (stage1 runs: $cmdline)"
    else
        qdisc=$(compose exec -T stage1 tc qdisc show dev eth0 2>&1 || true)
        [[ $qdisc == *netem*delay* ]] || fail "DSD_LINK_DELAY_MS=$DELAY_MS but stage1 has no netem qdisc: $qdisc"
        say "link: netem on stage1's eth0: $qdisc"
    fi
    # With DSD_NETEM_FALLBACK=fail (the default) a delay that netem cannot apply stops the container.
    refuse_rc=0
    refuse=$("$docker" run --rm --cap-add NET_ADMIN -e DSD_LINK_DELAY_MS="$DELAY_MS" "$IMAGE" echo ran 2>&1) || refuse_rc=$?
    if [[ $logs == *"falling back"* ]]; then
        [[ $refuse_rc != 0 && $refuse != *$'\n'ran* && $refuse == *"refusing to run"* ]] ||
            fail "DSD_NETEM_FALLBACK=fail ran without the requested delay (rc $refuse_rc): $refuse"
        say "link: without the fallback the entrypoint refuses (rc $refuse_rc)"
    fi
fi

printf 'compose_check: summary: base_image=%s base_s=%s image_s=%s healthy_s=%s generate_s=%s total_s=%s\n' \
    "$base" "$t_base" "$t_image" "$t_healthy" "$t_gen" "$(since "$t_start")" >&2
