"""Link settings for the userspace emulator: LinkConfig (delay, jitter, rate), tc-style rates, DSD_LINK_* parsing.

Also what the daemon reads to decide whether to run behind the emulator (:func:`emulator_requested`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}  # fmt: skip


def parse_rate(text: str) -> float:
    """Parse a rate the way ``tc`` does and return bits per second.

    ``10mbit``, ``1gbit``, ``500kbit``, a bare number (bit/s); ``...bps`` means *bytes* per second,
    as in tc. Units are decimal (1 mbit = 10**6 bit). Raises ValueError with a readable message.
    """
    m = _RATE_RE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(
            f"invalid rate {text!r}: expected a positive number with an optional unit "
            "bit/kbit/mbit/gbit/tbit (bits per second) or bps/kbps/mbps/gbps (bytes per second, as in tc), "
            "e.g. 10mbit"
        )
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


@dataclass
class LinkConfig:
    """Link properties, applied to each direction of each relayed connection.

    delay_ms: one-way delay; jitter_ms: uniform +-jitter added to the delay (never reorders bytes);
    rate_bps: bandwidth limit in bit/s (None = unlimited); seed: seed of the jitter RNG.
    """

    delay_ms: float = 0
    jitter_ms: float = 0
    rate_bps: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError("rate_bps must be > 0 (or None for unlimited)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LinkConfig:
        """Build a config from DSD_LINK_DELAY_MS, DSD_LINK_JITTER_MS, DSD_LINK_RATE, DSD_LINK_SEED."""
        env = os.environ if env is None else env

        def num(name: str) -> float:
            raw = env.get(name, "").strip() or "0"
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None

        rate = env.get("DSD_LINK_RATE", "").strip()
        seed = env.get("DSD_LINK_SEED", "").strip()
        return cls(
            delay_ms=num("DSD_LINK_DELAY_MS"),
            jitter_ms=num("DSD_LINK_JITTER_MS"),
            rate_bps=parse_rate(rate) if rate not in ("", "0") else None,
            seed=int(seed) if seed else None,
        )

    def describe(self) -> str:
        """Human-readable summary, e.g. ``delay 25.0 ms, jitter 0.0 ms, rate unlimited``."""
        rate = "unlimited" if self.rate_bps is None else f"{self.rate_bps / 1e6:g} mbit/s"
        return f"delay {float(self.delay_ms):.1f} ms, jitter {float(self.jitter_ms):.1f} ms, rate {rate}"


def emulator_requested(env: Mapping[str, str] | None = None) -> bool:
    """True when the container entrypoint asked for the userspace emulator (DSD_LINK_EMULATOR=1)."""
    env = os.environ if env is None else env
    return env.get("DSD_LINK_EMULATOR", "").strip().lower() in ("1", "true", "yes")
