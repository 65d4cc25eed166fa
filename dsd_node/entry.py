"""The `dsd` command's entry point: imports the CLI (torch, transformers and libp2p: a few seconds) under the
same Ctrl-C handling as the command itself, so an early Ctrl-C ends with one line and exit code 130 instead of
an import's traceback."""

from __future__ import annotations

import sys


def dsd() -> None:
    try:
        from dsd_node.cli import main
    except KeyboardInterrupt:
        print("\ndsd: interrupted", file=sys.stderr)
        sys.exit(130)
    main()
