"""docker-compose.yml, the Dockerfile and .ci/install.sh agree with each other and with dsd_node.ops.compose.

No Docker engine is needed. The netem entrypoint's own behaviour (delay requested, no netem: exit non-zero
without running the command) is tested in tests/test_netem_scripts.py; here only the image's entry chain.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsd_node.ops import compose
from dsd_node.ops.compose import check_compose, check_compose_doc, load_compose, peer_id_of_key, specs_from_compose

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / ".ci" / "install.sh"
BOOT_ID = peer_id_of_key(ROOT / "bootstrap" / "identity.key")
NODES = ["bootstrap", "stage0", "stage1", "stage2", "stage3", "gateway"]


@pytest.fixture(scope="module")
def doc() -> dict:
    return load_compose(COMPOSE, {})


@pytest.fixture
def nodespec(monkeypatch: pytest.MonkeyPatch) -> None:
    """NodeSpec with its `health` field (a stand-in until dsd_node.ops.testnet.NodeSpec has it)."""
    import dsd_node.ops.testnet as testnet

    if "health" not in testnet.NodeSpec.__dataclass_fields__:
        @dataclass
        class Spec(testnet.NodeSpec):
            health: str = "grpc"

        monkeypatch.setattr(testnet, "NodeSpec", Spec)


def test_compose_file_is_consistent(doc: dict) -> None:
    assert check_compose(COMPOSE, {}) == []
    assert list(doc["services"]) == [*NODES, "client"]
    assert doc["services"]["client"]["profiles"] == ["client"]


def _set_arg(svc: dict, flag: str, value: str) -> None:
    cmd = svc["command"]
    cmd[cmd.index(flag) + 1] = value


FAULTS = {
    "layer gap": (lambda d: _set_arg(d["services"]["stage1"], "--layers", "2:3"), "layers 3:4 are hosted by no stage"),
    "layer overlap": (lambda d: _set_arg(d["services"]["stage2"], "--layers", "3:6"), "layers 3:4 are hosted by more"),
    "no NET_ADMIN": (lambda d: d["services"]["stage2"].pop("cap_add"), "stage2: cap_add lacks NET_ADMIN"),
    "port clash": (lambda d: d["services"]["stage0"].update(ports=["127.0.0.1:6000:6000"]),
                   "host port 6000/tcp is published by both stage0 and gateway"),
    "no healthcheck": (lambda d: d["services"]["stage3"].pop("healthcheck"), "stage3: no healthcheck"),
    "healthcheck port": (lambda d: d["services"]["bootstrap"]["healthcheck"].update(test=["CMD", "true", ":6000"]),
                         "bootstrap: healthcheck does not probe port 4001"),
    "no netem env": (lambda d: d["services"]["stage0"]["environment"].pop("DSD_LINK_DELAY_MS"),
                     "stage0: environment lacks DSD_LINK_DELAY_MS"),
    "entrypoint": (lambda d: d["services"]["stage0"].update(entrypoint=["dsd-node"]),
                   "stage0: entrypoint does not run netem/entrypoint.sh"),
    "peer id": (lambda d: _set_arg(d["services"]["stage3"], "--bootstrap", "/dns4/bootstrap/tcp/4001/p2p/12D3KooWX"),
                f"stage3: --bootstrap peer id 12D3KooWX is not identity.key's peer id {BOOT_ID}"),
    "bootstrap port": (lambda d: _set_arg(d["services"]["stage3"], "--bootstrap", f"/dns4/bootstrap/tcp/4002/p2p/{BOOT_ID}"),
                       "stage3: --bootstrap port 4002 is not bootstrap's --listen-p2p port 4001"),
    "advertise": (lambda d: _set_arg(d["services"]["stage2"], "--advertise", "stage1:6000"),
                  "stage2: --advertise stage1:6000 is not this service's"),
    "bad node flag": (lambda d: d["services"]["stage0"]["command"].append("--no-such-flag"),
                      "stage0: dsd-node: error: unrecognized arguments: --no-such-flag"),
    "client": (lambda d: d["services"]["client"].update(command=["curl", "gateway:6000"]),
               "client: command must be a dsd command"),
    "client gateway": (lambda d: d["services"]["client"].update(command=["dsd", "generate", "--gateway", "stage0:6000"]),
                       "client: --gateway stage0:6000 is not a head service's gRPC port"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_check_compose_catches_seeded_faults(doc: dict, fault: str) -> None:
    mutate, expected = FAULTS[fault]
    bad = copy.deepcopy(doc)
    mutate(bad)
    problems = check_compose_doc(bad, ROOT)
    assert any(expected in p for p in problems), problems


def test_specs_from_compose_maps_every_service_onto_loopback(tmp_path: Path, nodespec: None) -> None:
    specs = specs_from_compose(COMPOSE, threads=2, environ={}, workdir=tmp_path)
    by = {s.name: s for s in specs}
    assert [s.name for s in specs] == NODES  # dependency order: bootstrap first, gateway last
    assert len({s.address for s in specs}) == len(specs)
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", s.address) for s in specs)
    assert [s.health for s in specs] == ["tcp"] + ["grpc"] * 5
    for s in specs:
        text = " ".join(s.args)
        for container_only in ("0.0.0.0", "/dns4/", "{hostname}", "/data/", "/app/"):
            assert container_only not in text, (s.name, text)
        arg = dict(zip(s.args, s.args[1:], strict=False))
        assert Path(arg["--identity"]).parent == tmp_path / s.name
        assert s.env["DSD_LINK_DELAY_MS"] == "0" and "DSD_LINK_EMULATOR" not in s.env
        if s.name != "bootstrap":
            assert arg["--listen"] == arg["--advertise"] == s.address
            assert arg["--threads"] == "2"
            assert arg["--bootstrap"] == f"/ip4/127.0.0.1/tcp/{by['bootstrap'].address.split(':')[1]}/p2p/{BOOT_ID}"
            assert arg["--listen-p2p"].startswith("/ip4/127.0.0.1/tcp/")
    boot = dict(zip(by["bootstrap"].args, by["bootstrap"].args[1:], strict=False))
    assert boot["--listen-p2p"] == f"/ip4/127.0.0.1/tcp/{by['bootstrap'].address.split(':')[1]}"
    key = Path(boot["--identity"])
    assert key.stat().st_mode & 0o777 == 0o600 and peer_id_of_key(key) == BOOT_ID
    assert "--threads" not in by["bootstrap"].args
    assert [by[f"stage{i}"].args[by[f"stage{i}"].args.index("--layers") + 1] for i in range(4)] == ["0:2", "2:4", "4:6", "6:8"]


def test_requested_delay_turns_on_the_userspace_emulator(tmp_path: Path, nodespec: None) -> None:
    specs = specs_from_compose(COMPOSE, environ={"DSD_LINK_DELAY_MS": "25"}, workdir=tmp_path)
    assert all(s.env["DSD_LINK_DELAY_MS"] == "25" and s.env["DSD_LINK_EMULATOR"] == "1" for s in specs)


def test_interpolation() -> None:
    env = {"A": "1", "E": ""}
    assert compose.interpolate(["${A:-x}", "${B:-x}", "${E:-x}", "${E-x}", "$A$$", "{hostname}"], env) == \
        ["1", "x", "x", "", "1$", "{hostname}"]


def test_dockerfile_installs_with_the_ci_script() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^RUN\b[^\n]*(\\\n[^\n]*)*\.ci/install\.sh", text, re.M), "the Dockerfile must RUN .ci/install.sh"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^USER dsd$", text, re.M) and "iproute2" in text and "setcap cap_net_admin+ep" in text
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1))
    assert entry[0] == "/app/netem/entrypoint.sh"
    assert re.search(r"^HEALTHCHECK .*\n?.*dsd_node\.ops\.compose\", \"health\"", text, re.M)
    for src in re.findall(r"^COPY (?!--)(.*) \S+$", text, re.M):  # every file of the dependency layer exists
        for f in src.split():
            assert f.endswith("*") or (ROOT / f).exists(), f


def test_install_script() -> None:
    text = INSTALL.read_text()
    assert "set -euo pipefail" in text and "tools/gen_proto.py --check" in text and "TORCH_INDEX_URL" in text
    assert subprocess.run(["bash", "-n", str(INSTALL)]).returncode == 0
    pin = subprocess.run(["sed", "-n", r's/^ *"\(torch==[^"]*\)".*/\1/p', str(ROOT / "pyproject.toml")],
                         capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"torch==[\d.]+", pin), pin


def _entry_chain() -> list[str]:
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", DOCKERFILE.read_text(), re.M).group(1))
    return [str(ROOT / e[len("/app/"):]) if e.startswith("/app/") else e for e in entry]


def test_image_entry_chain_expands_hostname_and_refuses_a_missing_link() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    import sys

    chain = [c if c != "python" else sys.executable for c in _entry_chain()]
    ok = subprocess.run([*chain, "echo", "{hostname}:6000"], capture_output=True, text=True, timeout=60,
                        env={**env, "DSD_LINK_DELAY_MS": "0"})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{socket.gethostname()}:6000"
    bad = subprocess.run([*chain, "echo", "ran"], capture_output=True, text=True, timeout=60,
                         env={**env, "DSD_LINK_DELAY_MS": "25", "DSD_TC": "/nonexistent/tc"})
    assert bad.returncode != 0 and "ran" not in bad.stdout
    assert "refusing to run" in bad.stderr


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.slow
def test_health_command(health_server) -> None:
    servicer, addr = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert compose.health(addr) is None and compose.health(addr, tcp=True) is None
    assert compose.main(["health", addr]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert "NOT_SERVING" in compose.health(addr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    assert "UNAVAILABLE" in compose.health(closed, timeout=1)
    assert compose.main(["health", "--tcp", closed]) == 1


def _docker_compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


@pytest.mark.slow
@pytest.mark.skipif(_docker_compose() is None, reason="docker compose is not installed")
def test_docker_compose_accepts_the_file() -> None:
    proc = subprocess.run([*_docker_compose(), "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
