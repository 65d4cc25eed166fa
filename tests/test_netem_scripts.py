"""Tests of netem/tc_netem.sh and netem/entrypoint.sh.

The real ``tc`` is only used on a harmless interface (an unused ifb device, or lo) and only where
netem is expected to fail; if it succeeds there the qdisc is removed again and the test is skipped.
Everything else uses a fake tc (DSD_TC) that records its arguments, so no qdisc is ever changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NETEM = Path(__file__).resolve().parents[1] / "netem"
TC_NETEM = NETEM / "tc_netem.sh"
ENTRYPOINT = NETEM / "entrypoint.sh"
CLEAR_MESSAGES = ("this kernel has no netem qdisc", "no permission to change the qdisc", "not found: install iproute2")
RAW_BASH_ERRORS = ("unbound variable", "syntax error", "command not found", "line ")
SHOW_ENV = 'echo "ran emulator=${DSD_LINK_EMULATOR:-unset} delay=${DSD_LINK_DELAY_MS:-unset}"'


def run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSD_")}
    return subprocess.run(
        ["bash", str(script), *args], env={**base, **env}, capture_output=True, text=True, timeout=20, check=False
    )


def assert_clean_error(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert proc.returncode != 0, proc
    assert any(e in proc.stderr for e in expected), proc.stderr
    assert not any(e in proc.stderr for e in RAW_BASH_ERRORS), proc.stderr


@pytest.fixture
def fake_tc(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for tc: logs its arguments, prints $FAKE_TC_OUT to stderr, exits with $FAKE_TC_RC."""
    log = tmp_path / "tc.log"
    tc = tmp_path / "tc"
    tc.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$*" >> "$FAKE_TC_LOG"\n'
        '[ -z "$FAKE_TC_OUT" ] || printf "%s\\n" "$FAKE_TC_OUT" >&2\nexit "${FAKE_TC_RC:-0}"\n'
    )
    tc.chmod(0o755)
    return tc, log


def fake_env(fake: tuple[Path, Path], out: str = "", rc: int = 0) -> dict[str, str]:
    return {"DSD_TC": str(fake[0]), "FAKE_TC_LOG": str(fake[1]), "FAKE_TC_OUT": out, "FAKE_TC_RC": str(rc)}


def tc_calls(fake: tuple[Path, Path]) -> list[str]:
    return fake[1].read_text().splitlines() if fake[1].exists() else []


def harmless_iface() -> str:
    """An interface whose qdisc nobody uses: a (down) ifb device if there is one, else lo."""
    net = Path("/sys/class/net")
    ifbs = sorted(p.name for p in net.glob("ifb*")) if net.exists() else []
    return ifbs[0] if ifbs else "lo"


@pytest.mark.parametrize("script", [TC_NETEM, ENTRYPOINT])
def test_scripts_parse(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", str(TC_NETEM), str(ENTRYPOINT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_apply_with_real_tc_fails_clearly_without_netem() -> None:
    iface = harmless_iface()
    proc = run(TC_NETEM, "apply", iface, DSD_LINK_DELAY_MS="25")
    if proc.returncode == 0:  # this host has netem and the rights to use it: undo and skip
        run(TC_NETEM, "clear", iface)
        pytest.skip(f"netem works here (applied and cleared on {iface})")
    assert proc.returncode in (3, 4, 5), proc
    assert_clean_error(proc, *CLEAR_MESSAGES)


def test_apply_nothing_requested_is_a_noop(fake_tc: tuple[Path, Path]) -> None:
    proc = run(TC_NETEM, "apply", **fake_env(fake_tc), DSD_LINK_DELAY_MS="0", DSD_LINK_RATE="0")
    assert proc.returncode == 0, proc
    assert "nothing to do" in proc.stdout
    assert tc_calls(fake_tc) == []


def test_apply_builds_an_idempotent_netem_command(fake_tc: tuple[Path, Path]) -> None:
    env = {"DSD_LINK_DELAY_MS": "25", "DSD_LINK_JITTER_MS": "5", "DSD_LINK_LOSS_PCT": "1.5", "DSD_LINK_RATE": "100mbit"}
    for _ in range(2):
        assert run(TC_NETEM, "apply", "veth7", **fake_env(fake_tc), **env).returncode == 0
    assert run(TC_NETEM, "apply", **fake_env(fake_tc), DSD_LINK_RATE="1000000", DSD_LINK_IFACE="eth1").returncode == 0
    assert tc_calls(fake_tc) == [
        "qdisc replace dev veth7 root netem delay 25ms 5ms loss 1.5% rate 100mbit",
        "qdisc replace dev veth7 root netem delay 25ms 5ms loss 1.5% rate 100mbit",
        "qdisc replace dev eth1 root netem rate 1000000bit",
    ]


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("DSD_LINK_DELAY_MS", "abc", "DSD_LINK_DELAY_MS='abc' is not a valid number"),
        ("DSD_LINK_JITTER_MS", "-3", "DSD_LINK_JITTER_MS='-3' is not a valid number"),
        ("DSD_LINK_LOSS_PCT", "150", "must be between 0 and 100"),
        ("DSD_LINK_RATE", "fast", "DSD_LINK_RATE='fast' is not a valid rate"),
    ],
)
def test_bad_values_are_rejected(fake_tc: tuple[Path, Path], var: str, value: str, message: str) -> None:
    proc = run(TC_NETEM, "apply", **fake_env(fake_tc), **{"DSD_LINK_DELAY_MS": "25", var: value})
    assert proc.returncode == 2
    assert_clean_error(proc, message)
    assert tc_calls(fake_tc) == []


@pytest.mark.parametrize(
    ("tc_output", "code", "message"),
    [
        ("RTNETLINK answers: Operation not permitted", 4, "needs CAP_NET_ADMIN"),
        ("Error: Specified qdisc kind is unknown.", 5, "this kernel has no netem qdisc"),
        ('Unknown qdisc "netem", hence option "delay" is unparsable', 5, "this kernel has no netem qdisc"),
        ('Cannot find device "eth9"', 6, "network interface 'eth0' does not exist"),
        ("Error: something else", 1, "failed: Error: something else"),
    ],
)
def test_tc_errors_are_translated(fake_tc: tuple[Path, Path], tc_output: str, code: int, message: str) -> None:
    proc = run(TC_NETEM, "apply", **fake_env(fake_tc, tc_output, 2), DSD_LINK_DELAY_MS="25")
    assert proc.returncode == code
    assert_clean_error(proc, message)


def test_missing_tc() -> None:
    proc = run(TC_NETEM, "apply", DSD_TC="/nonexistent/tc", DSD_LINK_DELAY_MS="25")
    assert proc.returncode == 3
    assert_clean_error(proc, "not found: install iproute2")


def test_clear_show_and_usage(fake_tc: tuple[Path, Path]) -> None:
    gone = fake_env(fake_tc, "Error: Cannot delete qdisc with handle of zero.", 2)
    proc = run(TC_NETEM, "clear", "eth3", **gone)
    assert proc.returncode == 0 and "no root qdisc to clear" in proc.stdout
    assert run(TC_NETEM, "clear", "eth3", **fake_env(fake_tc)).returncode == 0
    assert run(TC_NETEM, "show", **fake_env(fake_tc)).returncode == 0
    assert tc_calls(fake_tc) == ["qdisc del dev eth3 root", "qdisc del dev eth3 root", "qdisc show dev eth0"]
    assert_clean_error(run(TC_NETEM, "clear", **fake_env(fake_tc, "Operation not permitted", 2)), "CAP_NET_ADMIN")
    assert run(TC_NETEM).returncode == 2
    assert run(TC_NETEM, "frobnicate").returncode == 2


def test_entrypoint_refuses_to_run_without_requested_delay(fake_tc: tuple[Path, Path]) -> None:
    proc = run(ENTRYPOINT, "sh", "-c", SHOW_ENV, **fake_env(fake_tc, "Unknown qdisc", 2), DSD_LINK_DELAY_MS="25")
    assert proc.returncode == 5
    assert_clean_error(proc, "refusing to run without it")
    assert "ran" not in proc.stdout


@pytest.mark.slow
def test_entrypoint_with_real_tc_refuses_to_run() -> None:
    iface = harmless_iface()
    proc = run(ENTRYPOINT, "sh", "-c", SHOW_ENV, DSD_LINK_DELAY_MS="25", DSD_LINK_IFACE=iface)
    if proc.returncode == 0:
        run(TC_NETEM, "clear", iface)
        pytest.skip(f"netem works here (applied and cleared on {iface})")
    assert_clean_error(proc, "refusing to run without it")
    assert any(m in proc.stderr for m in CLEAR_MESSAGES), proc.stderr
    assert "ran" not in proc.stdout


def test_entrypoint_falls_back_to_the_emulator(fake_tc: tuple[Path, Path]) -> None:
    env = fake_env(fake_tc, "RTNETLINK answers: Operation not permitted", 2)
    proc = run(ENTRYPOINT, "sh", "-c", SHOW_ENV, **env, DSD_LINK_DELAY_MS="25", DSD_NETEM_FALLBACK="emulator")
    assert proc.returncode == 0, proc
    assert proc.stdout == "ran emulator=1 delay=25\n"  # the script's own messages stay on stderr
    assert "falling back to the userspace link emulator" in proc.stderr


def test_entrypoint_without_delay_just_runs(fake_tc: tuple[Path, Path]) -> None:
    proc = run(ENTRYPOINT, "sh", "-c", SHOW_ENV + "; exit 7", **fake_env(fake_tc, "Unknown qdisc", 2))
    assert proc.returncode == 7  # exec: the command's own status
    assert proc.stdout == "ran emulator=unset delay=unset\n"
    assert tc_calls(fake_tc) == []


def test_entrypoint_applies_netem_when_possible(fake_tc: tuple[Path, Path]) -> None:
    proc = run(ENTRYPOINT, "sh", "-c", SHOW_ENV, **fake_env(fake_tc), DSD_LINK_DELAY_MS="25")
    assert proc.returncode == 0, proc
    assert proc.stdout == "ran emulator=unset delay=25\n"
    assert tc_calls(fake_tc) == ["qdisc replace dev eth0 root netem delay 25ms"]


def test_entrypoint_explicit_emulator_skips_tc(fake_tc: tuple[Path, Path]) -> None:
    proc = run(ENTRYPOINT, "sh", "-c", SHOW_ENV, **fake_env(fake_tc), DSD_LINK_DELAY_MS="25", DSD_LINK_EMULATOR="1")
    assert proc.stdout == "ran emulator=1 delay=25\n"
    assert tc_calls(fake_tc) == []


def test_entrypoint_config_errors_are_always_fatal(fake_tc: tuple[Path, Path]) -> None:
    bad = run(ENTRYPOINT, "true", **fake_env(fake_tc), DSD_LINK_DELAY_MS="abc", DSD_NETEM_FALLBACK="emulator")
    assert bad.returncode == 2
    assert_clean_error(bad, "is not a valid number")
    assert_clean_error(run(ENTRYPOINT, "true", DSD_NETEM_FALLBACK="maybe"), "DSD_NETEM_FALLBACK='maybe' is invalid")
    assert_clean_error(run(ENTRYPOINT), "no command given")
