"""`dsd testnet up`'s console: it reports nodes that exit (the testnet keeps running; the network serves through
replicas) and reads commands on stdin to break and mend nodes for demonstrations:

    status            every node, its address and state (running, frozen, exited with its code)
    kill NAME         SIGKILL the node (a crash)
    stop NAME         SIGTERM the node (a clean leave: it withdraws its records)
    freeze NAME       SIGSTOP the node (a hung peer: alive but silent)
    resume NAME       SIGCONT a frozen node
    restart NAME      start the node again with the same arguments (its address and identity), killing it first
    help              this list
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable

from dsd_node.ops.testnet import Testnet

COMMANDS = {"kill": signal.SIGKILL, "stop": signal.SIGTERM, "freeze": signal.SIGSTOP, "resume": signal.SIGCONT}
HELP = "commands: status | kill NAME | stop NAME | freeze NAME | resume NAME | restart NAME | help"


class Console:
    """Applies console commands to a running Testnet and notices nodes that exit."""

    def __init__(self, net: Testnet, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)):
        self.net, self.say = net, say
        self.frozen: set[str] = set()
        self.reported: dict[str, int] = {}  # name -> pid whose exit was reported

    def check_exits(self) -> list[str]:
        """Report each node that exited since the last check (once per process); returns their names."""
        out = []
        for name, p in self.net.procs.items():
            if p.poll() is not None and self.reported.get(name) != p.pid:
                self.reported[name] = p.pid
                self.frozen.discard(name)
                out.append(name)
                self.say(f"dsd: {name} exited with code {p.returncode}; the testnet keeps running "
                         f"(replicas serve its part, if any); `restart {name}` starts it again")
        return out

    def status(self) -> str:
        rows = []
        for spec in self.net.specs:
            p = self.net.procs.get(spec.name)
            state = ("not started" if p is None else f"exited ({p.returncode})" if p.poll() is not None
                     else "frozen" if spec.name in self.frozen else "running")
            rows.append(f"  {spec.name:12s} {spec.address:22s} {state}")
        return "\n".join(rows)

    def command(self, line: str) -> str:
        """Run one console line; returns what to print."""
        words = line.split()
        if not words:
            return ""
        cmd, args = words[0].lower(), words[1:]
        if cmd == "help":
            return HELP
        if cmd == "status":
            return self.status()
        if cmd not in (*COMMANDS, "restart") or len(args) != 1:
            return f"unknown command {line.strip()!r}; {HELP}"
        name = args[0]
        spec = next((s for s in self.net.specs if s.name == name), None)
        if spec is None:
            return f"no node named {name!r}; nodes: {', '.join(s.name for s in self.net.specs)}"
        p = self.net.procs.get(name)
        if cmd == "restart":
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
            self.frozen.discard(name)
            self.net.start(spec)
            return f"{name}: restarted (pid {self.net.procs[name].pid}) at {spec.address}"
        if p is None or p.poll() is not None:
            return f"{name} is not running (`restart {name}` starts it)"
        p.send_signal(COMMANDS[cmd])
        if cmd == "freeze":
            self.frozen.add(name)
        elif cmd == "resume":
            self.frozen.discard(name)
        return f"{name}: {cmd} (pid {p.pid})"

    def attach_stdin(self) -> bool:
        """Read commands from stdin as they come (a terminal or a pipe); False when stdin cannot be watched."""
        loop = asyncio.get_running_loop()
        try:
            fd = sys.stdin.fileno()
            buf = bytearray()

            def readable() -> None:
                chunk = os.read(fd, 4096)
                if not chunk:  # end of input: stop watching, keep running
                    loop.remove_reader(fd)
                    return
                buf.extend(chunk)
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    reply = self.command(line.decode(errors="replace"))
                    if reply:
                        self.say(reply)

            loop.add_reader(fd, readable)
            return True
        except (OSError, ValueError, PermissionError, AttributeError):  # /dev/null, a file, no stdin
            return False

    def detach_stdin(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        except (OSError, ValueError, AttributeError):
            pass
