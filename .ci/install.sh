#!/usr/bin/env bash
# THE install steps, shared by CI (.ci/run), the README's quick start and the Docker image (Dockerfile), so a
# step missing here fails CI. Runs from the repository root wherever it is called from; idempotent (pip skips
# what is installed).
#
#   bash .ci/install.sh [EXTRAS] && . .venv/bin/activate
#
# Where it installs: into the active virtual environment ($VIRTUAL_ENV: CI, the Docker image, a venv you
# activated; created with $PYTHON if that directory does not exist yet); otherwise into .venv in the repository
# root, created with $PYTHON when missing. Activate it afterwards with `. .venv/bin/activate`. It never installs
# into the system interpreter (Debian's refuses with "externally-managed-environment", PEP 668) unless
# DSD_NO_VENV=1 says so.
#
# EXTRAS         optional-dependency groups of pyproject.toml, comma-separated (default: $DSD_EXTRAS, else
#                "test"). "test" is always included: the last step needs grpcio-tools. E.g. .ci/install.sh test,bench
# TORCH_INDEX_URL  pip index for torch alone. The Docker CPU build passes https://download.pytorch.org/whl/cpu
#                so a normal host gets the CPU wheel, not the multi-GB CUDA one; a CUDA build passes e.g.
#                https://download.pytorch.org/whl/cu128. Empty (CI, this machine): pip's configured indexes.
# PYTHON         the interpreter that creates the venv (default: python3, else python); >= 3.10
# DSD_VENV       the venv to create/use when none is active (default: .venv in the repository root)
# DSD_NO_VENV=1  install into $PYTHON itself (a conda env, a container's own Python)
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

extras=${1:-${DSD_EXTRAS:-test}}
[[ ,$extras, == *,test,* ]] || extras="test,$extras"

# --- the interpreter ---------------------------------------------------------------------------------------
base=${PYTHON:-}
if [[ -z $base ]]; then
    for cand in python3 python; do
        if command -v "$cand" >/dev/null; then base=$cand && break; fi
    done
    [[ -n $base ]] || die "no python3 on PATH (Debian/Ubuntu: sudo apt-get install -y python3 python3-venv python3-dev)"
fi
command -v "$base" >/dev/null || die "PYTHON=$base: command not found"
"$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$("$base" -V 2>&1) is too old: dsd needs Python >= 3.10 (set PYTHON=python3.11 or similar)"

if [[ ${DSD_NO_VENV:-0} == 1 ]]; then
    venv=""
    python=$base
elif [[ -n ${VIRTUAL_ENV:-} ]]; then
    venv=$VIRTUAL_ENV
else
    venv=${DSD_VENV:-.venv}
fi
if [[ -n $venv ]]; then
    if [[ ! -x $venv/bin/python ]]; then
        "$base" -c 'import ensurepip, venv' 2>/dev/null ||
            die "$base cannot create a virtual environment (no venv/ensurepip module)." \
                "Debian/Ubuntu: sudo apt-get install -y python3-venv"
        echo "install.sh: creating the virtual environment $venv with $base" >&2
        "$base" -m venv "$venv"
    fi
    python=$venv/bin/python
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$("$python" -V 2>&1) (in $venv) is too old: dsd needs Python >= 3.10 (remove $venv, set PYTHON=python3.11)"

# --- build tools for the one dependency without a wheel ----------------------------------------------------
# libp2p 0.8.1 pins fastecdsa==2.3.2, which PyPI has only as a source distribution: pip compiles it (C, GMP).
# Check the toolchain before pip gets there, unless it is installed already or a wheel of it is reachable
# (pip's configured find-links / indexes).
fastecdsa=fastecdsa==2.3.2
if ! "$python" -c 'import fastecdsa' 2>/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if ! "$python" -m pip download -q --only-binary=:all: --no-deps -d "$tmp" "$fastecdsa" >/dev/null 2>&1; then
        missing=()
        cc=${CC:-gcc}
        if ! command -v "$cc" >/dev/null; then
            missing+=(gcc)
        elif ! printf '#include <gmp.h>\n' | "$cc" -E -x c - >/dev/null 2>&1; then
            missing+=(libgmp-dev)
        fi
        pyinc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
        [[ -f $pyinc/Python.h ]] || missing+=(python3-dev)
        if ((${#missing[@]})); then
            die "pip must compile $fastecdsa (a libp2p dependency without a wheel), which needs a C compiler," \
                "the GMP headers and Python's headers; missing: ${missing[*]}." \
                "Debian/Ubuntu: sudo apt-get install -y gcc libgmp-dev python3-dev   (then run this again)"
        fi
    fi
fi

# --- install -------------------------------------------------------------------------------------------------
# torch first, on its own index if given; its pin comes from pyproject.toml (one place to bump it)
torch_req=$(sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
[[ -n $torch_req ]] || die "no \"torch==...\" pin found in pyproject.toml"
index_args=()
if [[ -n ${TORCH_INDEX_URL:-} ]]; then
    index_args=(--index-url "$TORCH_INDEX_URL")
fi
(
    set -x
    "$python" -m pip install ${index_args[@]+"${index_args[@]}"} "$torch_req"
    "$python" -m pip install -e ".[$extras]"
    "$python" tools/gen_proto.py --check # the committed gRPC code matches proto/dsd.proto
)

if [[ -n $venv && $venv != "${VIRTUAL_ENV:-}" ]]; then
    echo "install.sh: installed into $venv; activate it with:  . $venv/bin/activate" >&2
fi
