"""Generate dsd_node/proto/ from proto/dsd.proto with the pinned grpcio-tools (1.81.1).

    python tools/gen_proto.py          # write the generated modules
    python tools/gen_proto.py --check  # exit 1 if the committed modules differ from a fresh generation
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "dsd_node" / "proto"
PINNED = "1.81.1"


def generate(out: Path) -> None:
    from importlib.metadata import version

    from grpc_tools import protoc

    if version("grpcio-tools") != PINNED:
        sys.exit(f"grpcio-tools {PINNED} is required (found {version('grpcio-tools')}): pip install grpcio-tools=={PINNED}")
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", str(ROOT / "proto" / "dsd.proto")])
    if rc:
        sys.exit(f"protoc failed ({rc})")
    grpc_file = out / "dsd_pb2_grpc.py"  # make the import package-relative
    grpc_file.write_text(grpc_file.read_text().replace("import dsd_pb2 as dsd__pb2", "from . import dsd_pb2 as dsd__pb2"))
    (out / "__init__.py").write_text('"""Generated from proto/dsd.proto by tools/gen_proto.py. Do not edit."""\n')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if not args.check:
        generate(OUT)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [p.name for p in Path(tmp).iterdir() if not (OUT / p.name).exists() or (OUT / p.name).read_text() != p.read_text()]
    if stale:
        sys.exit(f"generated code is stale: {stale}; run python tools/gen_proto.py")


if __name__ == "__main__":
    main()
