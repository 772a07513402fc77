"""Machine instructions the bridge spends per request, counted by valgrind's callgrind.

Runs ``python -m bench.inproc`` under callgrind at two request counts and divides the
difference by the difference in requests, so start-up and warm-up cancel out. Instruction
counts do not move with the load on the machine (timings here move by ±5-30 %), which makes
this the measure for comparing two versions of the hot path:

    python -m bench.instructions --protocol awesomerpc --depth 1
    git worktree add ../before <commit>
    python -m bench.instructions --protocol awesomerpc --depth 1 --tree ../before

``--tree`` measures another checkout of the repository with this virtualenv: that checkout's
package is imported instead of the installed one (its ``bridge/`` and ``codecs/`` as
``metabridge`` and ``metabridge.codecs``, through a folder of symbolic links; a checkout from
before the package had that name as ``bridge``). A checkout from before the generated gRPC code
was committed needs it copied in (``cp bridge/_proto/*_pb2*.py ../before/bridge/_proto/``).
Needs valgrind (Debian's package).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Run a bench module from ``tree``: drop the editable install's import hook so that the folders
# first on sys.path (the tree, and the package's link farm) are what is imported.
_RUNNER = (
    "import runpy, sys; sys.path[:0] = {paths!r}; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(f)]; "
    "sys.argv = [{module!r}] + sys.argv[1:]; runpy.run_module({module!r}, run_name='__main__')"
)


_HERE = Path(__file__).resolve().parents[1]


def package_links(tree: Path, farm: Path) -> list[str]:
    """The sys.path entries that import ``tree``'s package: for a tree whose ``bridge/`` is
    installed as ``metabridge``, a ``metabridge`` folder in ``farm`` linking to bridge/'s
    entries, with ``codecs`` linking to the tree's codecs/."""
    tree = tree.resolve()
    if '"metabridge" = "bridge"' not in (tree / "pyproject.toml").read_text():
        return [str(tree)]  # from before the rename: the package is imported as ``bridge``
    package = farm / "metabridge"
    package.mkdir()
    for entry in (tree / "bridge").iterdir():
        (package / entry.name).symlink_to(entry)
    (package / "codecs").symlink_to(tree / "codecs")
    return [str(tree), str(farm)]


def callgrind(tree: Path, module: str, args: list[str]) -> int:
    """Instructions of one whole run of ``python -m module args`` from ``tree``, under callgrind."""
    with tempfile.TemporaryDirectory() as farm:
        # This checkout runs as installed; another one through the path hack.
        runner = ("-m", module) if tree.resolve() == _HERE else ("-c", _RUNNER.format(paths=package_links(tree, Path(farm)), module=module))
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, *runner, *args]
        result = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or not found:
        raise SystemExit(f"callgrind run failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return int(found.group(1))


def count(tree: Path, protocol: str, depth: int, requests: int, extra: list[str]) -> int:
    """Instructions of one whole bench.inproc run of ``requests`` requests."""
    return callgrind(tree, "bench.inproc", ["--protocol", protocol, "--depth", str(depth), "--requests", str(requests), "--repeat", "1", *extra])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("awesomerpc", "dubbo"), default="awesomerpc")
    parser.add_argument("--depth", type=int, default=1, help="requests per ext_proc message (default 1)")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="repository checkout to measure (default: this one)")
    parser.add_argument("--requests", type=int, nargs=2, default=(2000, 6000), metavar=("FEW", "MANY"))
    parser.add_argument("--with", dest="features", action="append", default=[], help="passed to bench.inproc (e.g. local_ratelimit, hash_policy, access_log, tracing)")
    args = parser.parse_args(argv)
    extra = [arg for feature in args.features for arg in ("--with", feature)]
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    few, many = args.requests
    per_request = (count(args.tree, args.protocol, args.depth, many, extra) - count(args.tree, args.protocol, args.depth, few, extra)) / (many - few)
    label = f", with {' and '.join(args.features)}" if args.features else ""
    print(f"{args.protocol} depth {args.depth}{label}: {per_request:,.0f} instructions per request ({args.tree})")


if __name__ == "__main__":
    main()
