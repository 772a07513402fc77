"""Regenerate bridge/_proto/*_pb2*.py from proto/ with grpcio-tools.

The generated modules are committed, so a wheel or an install from a clean clone needs no code
generation step and no grpcio-tools; run this after changing a .proto file (pinned grpcio-tools,
requirements.txt). ``--check`` exits 1 when the committed files differ from a fresh generation
(tests/unit/test_package.py runs it).
"""

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bridge" / "_proto"
# network_ext_proc: the wire contract with Envoy; ratelimit: Envoy's rate limit service API
# (the `ratelimit` filter's client and the test service).
SOURCES = ("network_ext_proc.proto", "ratelimit.proto")


def generate(out: Path) -> list[Path]:
    include = Path(grpc_tools.__file__).parent / "_proto"
    written = []
    for name in SOURCES:
        source = ROOT / "proto" / "metabridge" / name
        # Relative to proto/metabridge, so the generated files name their source the same way
        # wherever the repository is.
        args = ["grpc_tools.protoc", "-I.", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", name]
        with _chdir(source.parent):
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed for {source}")
        # grpc's generated stub imports its sibling as a top-level module; make it package-absolute.
        module = source.stem + "_pb2"
        grpc_file = out / f"{module}_grpc.py"
        grpc_file.write_text(grpc_file.read_text().replace(f"import {module} as", f"from metabridge._proto import {module} as"))
        written += [out / f"{module}.py", grpc_file]
    return written


@contextlib.contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing them")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [p.name for p in generate(Path(tmp)) if not (OUT / p.name).is_file() or (OUT / p.name).read_bytes() != p.read_bytes()]
    if stale:
        print(f"stale generated code in bridge/_proto: {', '.join(stale)}; run: python scripts/gen_proto.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
