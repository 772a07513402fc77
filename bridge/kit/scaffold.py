"""``metabridge new-codec NAME``: a new codec project that routes through Envoy as generated.

It writes, into NAME/ (or ``--dir``), one file per template in ``templates/``: a template's file
name loses its ``.tmpl`` suffix and has ``NAME`` replaced by the codec's name; its text goes
through ``string.Template.substitute`` with these placeholders:

    $name          the codec's name, e.g. myrpc (module myrpc.py, listener and codec myrpc)
    $class_name    the codec class, e.g. MyrpcCodec
    $port          Envoy's listener port (--port)
    $backend_port  the example backend's port: $port + 1
    $admin_port    Envoy's admin port: $port + 2
"""

from __future__ import annotations

import argparse
import importlib.machinery
import keyword
import os
import re
import sys
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_PORT = 10400

# Names the generated files import, and packages a codec project imports or runs beside: a codec
# module of that name would shadow them.
RESERVED = {"backend", "client", "samples", "test_codec", "conftest", "metabridge", "pytest", "yaml", "grpc", "google", "setuptools", "pip", "test", "tests", "examples"}
_ASCII_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


class ScaffoldError(Exception):
    """The project cannot be generated as asked (bad name, port or folder)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Write a codec project: the codec, sample frames, tests, an example config, a backend, a client and a README."
    parser.add_argument("name", help="the protocol's name: a Python identifier that names no standard or installed module, e.g. myrpc")
    parser.add_argument("--dir", type=Path, help="the folder to write (default: ./NAME)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Envoy's listener port in the example config; the backend gets PORT+1, Envoy's admin PORT+2 (default {DEFAULT_PORT})")
    parser.add_argument("--force", action="store_true", help="write into a folder that is not empty (files of the same names are replaced)")


def main(args: argparse.Namespace) -> int:
    target = args.dir if args.dir is not None else Path(args.name)
    try:
        written = generate(args.name, target, port=args.port, force=args.force)
    except ScaffoldError as exc:
        print(f"metabridge new-codec: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {target}/: {', '.join(path.name for path in written)}")
    print(f"next: cd {target} and follow README.md (python -m pytest; python backend.py; metabridge run -c {args.name}.yaml --with-envoy; python client.py)")
    return 0


def generate(name: str, target: Path, *, port: int = DEFAULT_PORT, force: bool = False) -> list[Path]:
    """Write the project for codec ``name`` into ``target``; return the files written."""
    check_name(name)
    if not 1 <= port <= 65533:
        raise ScaffoldError(f"--port {port}: the listener, backend and admin ports are PORT, PORT+1 and PORT+2; choose PORT in 1..65533")
    if target.exists() and not target.is_dir():
        raise ScaffoldError(f"{target} exists and is not a folder; choose another --dir")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ScaffoldError(f"{target} exists and is not empty; choose another --dir, or pass --force to replace the generated files in it")
    values = {
        "name": name,
        "class_name": "".join(part[:1].upper() + part[1:] for part in name.split("_")) + "Codec",
        "port": port,
        "backend_port": port + 1,
        "admin_port": port + 2,
    }
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for template in sorted(TEMPLATES.glob("*.tmpl")):
        path = target / template.name[: -len(".tmpl")].replace("NAME", name)
        path.write_text(Template(template.read_text()).substitute(values))
        written.append(path)
    return written


def check_name(name: str) -> None:
    """Raise ScaffoldError unless ``name`` can name the codec's module without shadowing another."""
    if not _ASCII_IDENTIFIER.match(name) or keyword.iskeyword(name):
        raise ScaffoldError(f"{name!r} is not a usable codec name: it names the codec's module, so it must be a Python identifier (ASCII letters, digits, underscores, starting with a letter) and not a keyword, e.g. myrpc")
    if name in sys.stdlib_module_names:
        shadowed = f"the standard library's {name} module"
    elif name in RESERVED:
        shadowed = f"the {name} module that the generated project or metabridge uses"
    elif _installed(name):
        shadowed = f"the installed {name} module"
    else:
        return
    raise ScaffoldError(f"{name!r} cannot name the codec: its module {name}.py would shadow {shadowed}; choose another name, e.g. {name}rpc")


def _installed(name: str) -> bool:
    """Whether ``name`` is importable from the installed packages (the current folder, where a
    previous run may have written NAME/, does not count)."""
    here = {"", ".", os.getcwd()}
    paths = [p for p in sys.path if p not in here]
    return importlib.machinery.PathFinder.find_spec(name, paths) is not None
