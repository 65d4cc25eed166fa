"""Link emulation for DSD test networks: ``tc netem`` scripts and a userspace TCP link emulator.

The emulator API (LinkConfig, LinkEmulator, measure_rtt, parse_rate, ...) lives in
:mod:`netem.link_emulator`; it is re-exported here lazily so that ``python -m netem.link_emulator``
does not import the module twice.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LinkConfig",
    "LinkEmulator",
    "emulator_requested",
    "measure_rtt",
    "parse_rate",
    "start_echo_server",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from netem import link_emulator

        return getattr(link_emulator, name)
    raise AttributeError(f"module 'netem' has no attribute {name!r}")
