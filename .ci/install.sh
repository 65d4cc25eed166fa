#!/usr/bin/env bash
# THE install steps, shared by CI (.ci/run) and the Docker image (Dockerfile), so a step missing here fails CI.
# Runs from the repository root wherever it is called from; idempotent (pip skips what is installed).
#
#   .ci/install.sh [EXTRAS]
#
# EXTRAS         optional-dependency groups of pyproject.toml, comma-separated (default: $DSD_EXTRAS, else
#                "test"). "test" is always included: the last step needs grpcio-tools. E.g. .ci/install.sh test,bench
# TORCH_INDEX_URL  pip index for torch alone. The Docker CPU build passes https://download.pytorch.org/whl/cpu
#                so a normal host gets the CPU wheel, not the multi-GB CUDA one; a CUDA build passes e.g.
#                https://download.pytorch.org/whl/cu128. Empty (CI, this machine): pip's configured indexes.
# PYTHON         the interpreter to install into (default: python)
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python}
extras=${1:-${DSD_EXTRAS:-test}}
[[ ,$extras, == *,test,* ]] || extras="test,$extras"

# torch first, on its own index if given; its pin comes from pyproject.toml (one place to bump it)
torch_req=$(sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
if [[ -z $torch_req ]]; then
    echo "install.sh: no \"torch==...\" pin found in pyproject.toml" >&2
    exit 1
fi
index_args=()
if [[ -n ${TORCH_INDEX_URL:-} ]]; then
    index_args=(--index-url "$TORCH_INDEX_URL")
fi
set -x
"$python" -m pip install ${index_args[@]+"${index_args[@]}"} "$torch_req"
"$python" -m pip install -e ".[$extras]"
"$python" tools/gen_proto.py --check # the committed gRPC code matches proto/dsd.proto
