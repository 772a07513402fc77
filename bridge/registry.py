"""Plugin registry: turns a config's codec and filter references into checked classes.

A reference is one of:
  path/to/file.py:Class   a single-file codec (relative paths: to the config file's folder)
  path/to/dir:Class       a codec package (a folder with __init__.py; relative imports work)
  package.module:Class    an importable module
  name                    an entry point in the ``metabridge.codecs`` (or ``metabridge.filters``)
                          group of an installed package

Files and folders are imported under a private module name (``_metabridge_codec_<stem>_<hash of the
path>_<hash of the content>``), never as ``codecs``, which is a standard-library module. Loading a
file again after it changed imports the new content under a new name and drops the old module
from ``sys.modules`` (its classes live on in whatever still holds them, such as open
connections' codecs); an unchanged file gives the same module. Modules and entry points are
imported once, as Python does.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from pathlib import Path

from metabridge.sdk.codec import REQUIRED_METHODS, Codec
from metabridge.sdk.filter import FILTER_HOOKS, Filter

ENTRY_POINT_GROUP = "metabridge.codecs"
FILTER_ENTRY_POINT_GROUP = "metabridge.filters"


class CodecLoadError(Exception):
    """A codec (or filter) reference that cannot be turned into a usable class."""


def _module_prefix(path: Path) -> str:
    """The start of the private module names of this file or folder: two codecs both called
    codec.py must not share (and so silently replace) one module."""
    stem = re.sub(r"\W", "_", path.stem)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return f"_metabridge_codec_{stem}_{digest}_"


def _content_digest(path: Path) -> str:
    """A hash of a file's bytes, or of every Python file's relative path and bytes in a folder."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the source as it is on disk, never a cached .pyc: a file rewritten within the
    same second with the same size would otherwise run its old bytecode."""

    def get_code(self, fullname):
        return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)


def _import_path(path: Path, ref: str):
    """The module of a file or folder as its content is now (imported once per content)."""
    if path.is_dir():
        init = path / "__init__.py"
        if not init.is_file():
            raise CodecLoadError(f"{ref!r}: folder {path} has no __init__.py")
    elif not path.is_file():
        raise CodecLoadError(f"{ref!r}: no such file or folder: {path}")
    prefix = _module_prefix(path)
    try:
        module_name = prefix + _content_digest(path)
    except OSError as exc:
        raise CodecLoadError(f"{ref!r}: cannot read {path}: {exc.strerror}") from exc
    if module_name in sys.modules:
        return sys.modules[module_name]
    if path.is_dir():
        # The package's submodules are found through this folder: with fresh sources too.
        sys.path_importer_cache[str(path)] = importlib.machinery.FileFinder(str(path), (_FreshSourceLoader, [".py"]))
        spec = importlib.util.spec_from_file_location(module_name, init, loader=_FreshSourceLoader(module_name, str(init)), submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(module_name, path, loader=_FreshSourceLoader(module_name, str(path)))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        _forget(module_name)
        raise CodecLoadError(f"{ref!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    for name in [n for n in sys.modules if n.startswith(prefix) and n != module_name and not n.startswith(module_name + ".")]:
        del sys.modules[name]  # an earlier content of this file or folder, and its submodules
    return module


def _forget(module_name: str) -> None:
    """Drop a module and its submodules (a package's) from sys.modules."""
    for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
        del sys.modules[name]


def _from_entry_point(name: str, group: str):
    for entry in importlib.metadata.entry_points(group=group):
        if entry.name == name:
            try:
                return entry.load()
            except Exception as exc:
                raise CodecLoadError(f"entry point {name!r} ({entry.value}) failed to load: {type(exc).__name__}: {exc}") from exc
    kind = "codec" if group == ENTRY_POINT_GROUP else "filter"
    raise CodecLoadError(f"{name!r}: no installed package offers a {kind} of that name in the {group!r} entry-point group; use 'file.py:Class' or 'package.module:Class'")


def load_codec_class(ref: str, base_dir: Path | str = ".") -> type[Codec]:
    """Resolve ``ref`` and check that the result honours the codec contract."""
    cls = _resolve(ref, base_dir, ENTRY_POINT_GROUP)
    check_codec_class(cls, ref)
    return cls


def load_filter_class(ref: str, base_dir: Path | str = ".") -> type[Filter]:
    """Resolve a filter reference and check it is a Filter with callable hooks."""
    cls = _resolve(ref, base_dir, FILTER_ENTRY_POINT_GROUP)
    if not (inspect.isclass(cls) and issubclass(cls, Filter)):
        raise CodecLoadError(f"{ref!r}: expected a subclass of metabridge.sdk.filter.Filter, got {cls!r}")
    missing = [h for h in FILTER_HOOKS if not callable(getattr(cls, h, None))]
    if missing:
        raise CodecLoadError(f"{ref!r}: {cls.__name__} hooks are not callable: {', '.join(missing)}")
    return cls


def reference_path(ref: str, base_dir: Path | str = ".") -> Path | None:
    """The file or folder a ``file.py:Class`` or ``dir:Class`` reference names (relative ones:
    to ``base_dir``), or None for a module or an entry point."""
    target, sep, _ = ref.rpartition(":")
    if not sep or not ("/" in target or target.endswith(".py") or target.startswith(".")):
        return None
    path = Path(target)
    return (path if path.is_absolute() else Path(base_dir) / path).resolve()


def _resolve(ref: str, base_dir: Path | str, group: str):
    """The object a reference names: a file or folder's attribute, a module's, or an entry point."""
    if ":" not in ref:
        cls = _from_entry_point(ref, group)
    else:
        target, _, attr = ref.rpartition(":")
        if not attr:
            raise CodecLoadError(f"{ref!r}: missing class name after ':'")
        path = reference_path(ref, base_dir)
        if path is not None:
            module = _import_path(path, ref)
        else:
            try:
                module = importlib.import_module(target)
            except Exception as exc:
                raise CodecLoadError(f"{ref!r}: cannot import module {target!r}: {type(exc).__name__}: {exc}") from exc
        try:
            cls = getattr(module, attr)
        except AttributeError:
            close = difflib.get_close_matches(attr, [name for name in vars(module) if not name.startswith("_")], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CodecLoadError(f"{ref!r}: {target} has no attribute {attr!r}{hint}") from None
    return cls


def check_codec_class(cls: object, ref: str) -> None:
    if not inspect.isclass(cls):
        raise CodecLoadError(f"{ref!r}: expected a class, got {type(cls).__name__}")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise CodecLoadError(f"{ref!r}: {cls.__name__} does not implement the codec contract: missing {', '.join(missing)}")
    not_implemented = [m for m in ("decode", "encode", "on_error") if getattr(cls, m) is getattr(Codec, m)]
    if not_implemented:
        raise CodecLoadError(f"{ref!r}: {cls.__name__} does not override {', '.join(not_implemented)}")
    if not isinstance(getattr(cls, "has_request_id", None), bool):
        raise CodecLoadError(f"{ref!r}: {cls.__name__}.has_request_id must be True or False")


def load_codecs(config) -> dict[str, type[Codec]]:
    """Load every codec a config names; errors name the config entry."""
    loaded = {}
    for name, entry in config.codecs.items():
        try:
            loaded[name] = load_codec_class(entry.ref, config.base_dir)
        except CodecLoadError as exc:
            raise CodecLoadError(f"{config.source}: codecs.{name}.ref: {exc}{config.at(f'codecs.{name}.ref')}") from exc
    return loaded
