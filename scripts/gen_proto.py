"""Generate bridge/_proto/*_pb2*.py from proto/ with grpcio-tools (run by scripts/setup.sh)."""

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bridge" / "_proto"


def main() -> int:
    include = Path(grpc_tools.__file__).parent / "_proto"
    source = ROOT / "proto" / "metabridge" / "network_ext_proc.proto"
    args = [
        "grpc_tools.protoc",
        f"-I{source.parent}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        str(source),
    ]
    if protoc.main(args) != 0:
        print(f"protoc failed for {source}", file=sys.stderr)
        return 1
    # grpc's generated stub imports its sibling as a top-level module; make it package-relative.
    grpc_file = OUT / "network_ext_proc_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import network_ext_proc_pb2 as", "from bridge._proto import network_ext_proc_pb2 as"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
