"""``metabridge new-codec NAME``: a new codec project that routes through Envoy as generated."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the protocol's name (a Python identifier, e.g. myrpc)")


def main(args: argparse.Namespace) -> int:
    raise SystemExit("metabridge new-codec: not implemented yet")
