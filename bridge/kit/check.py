"""``metabridge check-codec REF``: the conformance checks every codec author runs.

Exit status: 0 when every check passes, 1 when one fails, 2 when the codec or the samples file
cannot be loaded. The checks themselves are metabridge.kit.conformance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metabridge.kit.conformance import Samples, SamplesError, check_codec
from metabridge.registry import CodecLoadError, _import_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Check a codec against the codec contract with sample frames (docs/check-codec.md)."
    parser.add_argument("ref", help="the codec: file.py:Class, dir:Class, package.module:Class or an installed codec's name")
    parser.add_argument("--samples", metavar="FILE.py[:NAME]", help="a Python file defining NAME = Samples(...) (NAME defaults to SAMPLES); optional for the built-in codecs")
    parser.add_argument("--fuzz-seconds", type=float, default=2.0, metavar="S", help="how long to feed random and mutated input (default 2)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="the fuzz's random seed (default 0)")


def load_samples(spec: str) -> Samples:
    """The Samples that ``FILE.py[:NAME]`` names; SamplesError saying what is wrong otherwise."""
    path, sep, name = spec.rpartition(":")
    if not sep or not name.isidentifier():
        path, name = spec, "SAMPLES"
    file = Path(path).resolve()
    if not file.is_file():
        raise SamplesError(f"samples file {path} does not exist")
    try:
        module = _import_path(file, spec)
    except CodecLoadError as exc:
        raise SamplesError(str(exc)) from exc
    try:
        samples = getattr(module, name)
    except AttributeError:
        raise SamplesError(f"{path} defines no {name}; write {name} = Samples(requests=[...], responses=[...]) in it") from None
    if not isinstance(samples, Samples):
        raise SamplesError(f"{path}: {name} is a {type(samples).__name__}, not a metabridge.kit.conformance.Samples")
    return samples


def main(args: argparse.Namespace) -> int:
    try:
        samples = load_samples(args.samples) if args.samples else None
        report = check_codec(args.ref, samples, fuzz_seconds=args.fuzz_seconds, seed=args.seed)
    except (CodecLoadError, SamplesError) as exc:
        print(f"metabridge check-codec: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1
