"""``metabridge check-codec REF``: the conformance checks every codec author runs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="the codec: file.py:Class, dir:Class, package.module:Class or an installed codec's name")


def main(args: argparse.Namespace) -> int:
    raise SystemExit("metabridge check-codec: not implemented yet")
