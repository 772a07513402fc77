"""Generate bridge/_proto/*_pb2*.py from proto/ with grpcio-tools (run by scripts/setup.sh)."""

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bridge" / "_proto"
# network_ext_proc: the wire contract with Envoy; ratelimit: Envoy's rate limit service API
# (the `ratelimit` filter's client and the test service).
SOURCES = ("network_ext_proc.proto", "ratelimit.proto")


def main() -> int:
    include = Path(grpc_tools.__file__).parent / "_proto"
    for name in SOURCES:
        source = ROOT / "proto" / "metabridge" / name
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
        module = source.stem + "_pb2"
        grpc_file = OUT / f"{module}_grpc.py"
        text = grpc_file.read_text()
        grpc_file.write_text(text.replace(f"import {module} as", f"from bridge._proto import {module} as"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
