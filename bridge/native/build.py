"""Build the Envoy dynamic module (libmetabridge.so) next to this file with the system C compiler.

``python -m metabridge.native.build [--quiet]``: flags from this interpreter's sysconfig (the
module embeds this Python). Exits non-zero, saying why, when it cannot build (no compiler, no
shared libpython): the ext_proc mode does not need the module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "metabridge_module.c"
MODULE_NAME = "metabridge"  # Envoy loads lib<name>.so
LIBRARY = HERE / f"lib{MODULE_NAME}.so"


def libpython() -> Path | None:
    """The shared libpython this interpreter runs on, or None (a static build cannot be embedded twice).

    Its versioned file (INSTSONAME, e.g. libpython3.11.so.1.0) where there is one: the module
    re-opens this path at run time, and a system without the development files has only that
    one (Debian's libpython3.11; the unversioned libpython3.11.so link is in libpython3.11-dev).
    """
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    for name in (sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")):
        if name and (libdir / name).exists():
            return libdir / name
    return None


def up_to_date() -> bool:
    return LIBRARY.exists() and LIBRARY.stat().st_mtime >= SOURCE.stat().st_mtime


def build() -> Path:
    lib = libpython()
    if lib is None:
        raise RuntimeError(f"{sys.executable} has no shared libpython (built without --enable-shared)")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    version = sysconfig.get_config_var("LDVERSION") or sysconfig.get_config_var("VERSION")
    out = LIBRARY.with_suffix(".so.tmp")
    command = [
        compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Wno-unused-parameter",
        f"-I{sysconfig.get_paths()['include']}",
        f'-DMETABRIDGE_LIBPYTHON="{lib}"',
        str(SOURCE), "-o", str(out),
        f"-L{lib.parent}", f"-lpython{version}", f"-Wl,-rpath,{lib.parent}", "-ldl",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{result.stderr.strip()}")
    out.replace(LIBRARY)
    return LIBRARY


def main() -> int:
    quiet = "--quiet" in sys.argv
    if up_to_date() and "--force" not in sys.argv:
        return 0
    try:
        path = build()
    except RuntimeError as exc:
        print(f"metabridge native module not built: {exc}", file=sys.stderr)
        return 1
    if not quiet:
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
