"""Run `dsd-node` behind the userspace link emulator: `python -m netem.emulated_node [dsd-node flags...]`.

For kernels without the netem qdisc (and for local testnets): the emulator listens where the node was
asked to listen (--listen, or DSD_LISTEN) and relays every connection, with the DSD_LINK_* delay, jitter
and rate, to the node, which listens on a free loopback port instead and advertises the emulator's
address. The node itself knows nothing of the emulator; its own stage ("self" in a route) is reached
directly, without the emulated link.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from dsd_node import node_cli
from netem.link_emulator import LinkConfig, LinkEmulator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pop_flag(argv: list[str], name: str) -> str | None:
    """Remove `name VALUE` or `name=VALUE` from argv; return the value (the last one wins, as in argparse)."""
    value = None
    i = 0
    while i < len(argv):
        if argv[i] == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
        elif argv[i].startswith(name + "="):
            value = argv[i].split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return value


def emulated_argv(argv: list[str], environ=os.environ) -> tuple[list[str], LinkEmulator]:
    """The node's arguments behind an emulator (not started yet) listening where the node was asked to."""
    argv = list(argv)
    listen = _pop_flag(argv, "--listen") or environ.get("DSD_LISTEN") or "127.0.0.1:0"
    advertise = _pop_flag(argv, "--advertise") or environ.get("DSD_ADVERTISE")
    host, _, port = listen.rpartition(":")
    internal = _free_port()
    emulator = LinkEmulator(host or "127.0.0.1", int(port), "127.0.0.1", internal, LinkConfig.from_env(environ))
    return argv + ["--listen", f"127.0.0.1:{internal}"] + (["--advertise", advertise] if advertise else []), emulator


def main(argv: list[str] | None = None) -> None:
    args, emulator = emulated_argv(sys.argv[1:] if argv is None else argv)
    asyncio.run(emulator.start())  # the relay runs on its own thread and loop for the life of the process
    if "--advertise" not in args:
        host = emulator.listen_host if emulator.listen_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        args += ["--advertise", f"{host}:{emulator.port}"]
    print(f"link emulator on port {emulator.port} -> node ({emulator.config.describe()})", flush=True)
    node_cli.main(args)


if __name__ == "__main__":
    main()
