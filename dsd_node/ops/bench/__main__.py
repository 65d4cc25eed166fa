"""`python -m dsd_node.ops.bench ...`: the same sweep as `dsd bench ...`."""

import sys

from dsd_node.ops.bench.cli import main

sys.exit(main())
