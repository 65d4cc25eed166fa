# One image for every DSD role (bootstrap, stage, drafter, head) and the `dsd` client. See README.md, "Docker testnet".
#
#   docker build -t dsd-node:local .                    # CPU torch (python:3.11-slim)
#   docker build -t dsd-node:cuda --build-arg BASE_IMAGE=<image with python3 >= 3.10 and venv> \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   tools/compose_check.sh                              # build (offline-capable), start, generate, compare, tear down
#
# BuildKit is required (RUN --mount), and only the Dockerfile syntax built into the engine is used (no `# syntax=`
# line: that would fetch a frontend image from a registry). wheels/ (ignored by git) is pip's --find-links for the
# dependency layer and is not copied into the image: put the torch wheel there (`pip download torch==X --no-deps
# -d wheels`) and pass `--build-arg TORCH_INDEX_URL=` to install it instead of downloading one.
#
# The node runs as the unprivileged user `dsd`. tc (iproute2) carries the file capability cap_net_admin+ep, so
# netem/entrypoint.sh can shape eth0 as `dsd` when the container has NET_ADMIN in its bounding set
# (`cap_add: [NET_ADMIN]`); without it tc fails with "Operation not permitted" and the entrypoint refuses to
# start a node whose requested link delay cannot be applied.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG DSD_EXTRAS=test

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 libcap2-bin \
    && setcap cap_net_admin+ep "$(command -v tc)" \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --shell /bin/bash dsd \
    && mkdir -p /data && chown dsd:dsd /data

WORKDIR /app

# 1. Dependencies: only what .ci/install.sh needs, so this layer is rebuilt only when the dependencies, the
#    protocol or the install script change (not README.md: pyproject.toml's `readme` gets an empty stand-in, which
#    step 2 replaces). The editable install maps the top-level packages dsd_node and netem to /app, so the code
#    copied in step 2 is what runs.
COPY pyproject.toml ./
COPY .ci/install.sh .ci/
COPY tools/gen_proto.py tools/
COPY proto/ proto/
COPY dsd_node/__init__.py dsd_node/
COPY dsd_node/proto/ dsd_node/proto/
COPY netem/__init__.py netem/
#    .ci/install.sh creates the venv $VIRTUAL_ENV (so `python` below is the venv's, whatever the base calls its
#    interpreter). libp2p pins fastecdsa, which has no wheel on PyPI: unless wheels/ holds one, gcc and the GMP and
#    Python headers are installed for pip to compile it, and removed again in the same layer.
#    An optional build secret `pip_cert` (docker build --secret id=pip_cert,src=CA_BUNDLE) is pip's CA bundle, for
#    a network whose TLS proxy the base image does not trust; it stays out of the image.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=bind,source=wheels,target=/wheels \
    --mount=type=secret,id=pip_cert \
    set -eu; build_deps=""; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if ! ls /wheels/fastecdsa-*.whl >/dev/null 2>&1; then \
        build_deps="gcc libc6-dev libgmp-dev"; \
        python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
            || build_deps="$build_deps python3-dev"; \
        apt-get update && apt-get install -y --no-install-recommends $build_deps; \
    fi; \
    touch README.md; \
    PIP_FIND_LINKS=/wheels TORCH_INDEX_URL="$TORCH_INDEX_URL" DSD_EXTRAS="$DSD_EXTRAS" bash .ci/install.sh; \
    if [ -n "$build_deps" ]; then apt-get purge -y --auto-remove $build_deps && rm -rf /var/lib/apt/lists/*; fi

# 2. The embedded model pair (rarely changes), then the code: the build context but wheels/ (COPY . . would put
#    the wheels in a layer). The fixed testnet bootstrap key: git does not keep mode 0600, so set owner and mode
#    here (load_or_create_identity would otherwise try to tighten a root-owned file and fail).
COPY dsd_node/embedded/ dsd_node/embedded/
RUN --mount=type=bind,target=/ctx \
    tar -C /ctx --exclude=./wheels --exclude=./dsd_node/embedded -cf /tmp/ctx.tar . \
    && tar -C /app -xf /tmp/ctx.tar && rm /tmp/ctx.tar \
    && chown dsd:dsd bootstrap/identity.key && chmod 0600 bootstrap/identity.key
# /app is read-only for `dsd`: compile the bytecode now rather than on every start.
RUN python -m compileall -q dsd_node netem

USER dsd
# gRPC on 6000, libp2p on 4001 (the conventions of docker-compose.yml)
ENV DSD_LISTEN=0.0.0.0:6000
EXPOSE 6000 4001

# netem/entrypoint.sh applies DSD_LINK_* with tc, then `dsd_node.ops.compose exec` expands {hostname} / {ip} in the
# arguments (scaled replicas advertise themselves) and execs the command.
ENTRYPOINT ["/app/netem/entrypoint.sh", "python", "-m", "dsd_node.ops.compose", "exec", "--"]
CMD ["dsd-node", "--help"]
HEALTHCHECK --interval=5s --timeout=4s --start-period=180s --retries=3 \
    CMD ["python", "-m", "dsd_node.ops.compose", "health", "127.0.0.1:6000"]
