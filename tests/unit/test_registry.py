"""bridge/registry.py: every kind of codec reference, and every way one can be wrong."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from metabridge.sdk.codec import Codec, DecodeStatus
from metabridge.config.model import parse
from metabridge.registry import ENTRY_POINT_GROUP, CodecLoadError, check_codec_class, load_codec_class, load_codecs

ROOT = Path(__file__).resolve().parents[2]

GOOD_CODEC = '''
from metabridge.sdk.codec import Codec, DecodeStatus


class {cls}(Codec):
    name = "{name}"
    has_request_id = {has_request_id}

    def decode(self, buffer, metadata):
        return DecodeStatus.WAIT_FOR_DATA

    def encode(self, metadata, mutation):
        return metadata.frame

    def on_error(self, metadata, error):
        return b"error:" + error.message.encode()
'''


def codec_source(cls: str = "GoodCodec", name: str = "good", has_request_id: str = "True", extra: str = "") -> str:
    return GOOD_CODEC.format(cls=cls, name=name, has_request_id=has_request_id) + textwrap.dedent(extra)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def unique(prefix: str) -> str:
    """A module name no other test (or earlier run in this process) has imported."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# Prefixes of the modules these tests create: the registry's private names and unique() names.
TEST_MODULE_PREFIXES = ("_metabridge_codec_", "mb_test_pkg_", "mb_plugin_")


@pytest.fixture
def forget_modules():
    """Drops the codec modules a test imported, so tests do not leak into each other (only ours:
    dropping a standard-library module imported on the way would split it in two)."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(TEST_MODULE_PREFIXES):
            del sys.modules[name]


def load_error(ref: str, base_dir: Path | str = ".") -> str:
    with pytest.raises(CodecLoadError) as info:
        load_codec_class(ref, base_dir)
    return str(info.value)


# ---- references that work ------------------------------------------------------------------------


def test_single_file_relative_to_base_dir(tmp_path, forget_modules):
    write(tmp_path / "codecs" / "good.py", codec_source())
    cls = load_codec_class("codecs/good.py:GoodCodec", tmp_path)
    assert issubclass(cls, Codec) and cls.name == "good"
    assert cls().decode(bytearray(b"x"), None) is DecodeStatus.WAIT_FOR_DATA
    # Never imported as the standard library's `codecs`, which must stay intact.
    assert not cls.__module__.startswith("codecs")
    import codecs

    assert hasattr(codecs, "lookup")


def test_single_file_by_absolute_path_and_dot_relative(tmp_path, forget_modules):
    path = write(tmp_path / "abs_codec.py", codec_source(name="abs"))
    assert load_codec_class(f"{path}:GoodCodec", "/nonexistent-base").name == "abs"
    assert load_codec_class("./abs_codec.py:GoodCodec", tmp_path).name == "abs"


def test_loading_the_same_file_twice_gives_the_same_class(tmp_path, forget_modules):
    write(tmp_path / "twice.py", codec_source())
    assert load_codec_class("twice.py:GoodCodec", tmp_path) is load_codec_class("./twice.py:GoodCodec", tmp_path)


def test_two_files_with_the_same_name_are_two_codecs(tmp_path, forget_modules):
    write(tmp_path / "v1" / "codec.py", codec_source(cls="Codec1", name="first"))
    write(tmp_path / "v2" / "codec.py", codec_source(cls="Codec1", name="second"))
    first = load_codec_class("v1/codec.py:Codec1", tmp_path)
    second = load_codec_class("v2/codec.py:Codec1", tmp_path)
    assert (first.name, second.name) == ("first", "second")


def test_file_name_that_is_not_an_identifier(tmp_path, forget_modules):
    write(tmp_path / "my-codec.v2.py", codec_source(name="dotted"))
    assert load_codec_class("my-codec.v2.py:GoodCodec", tmp_path).name == "dotted"


def test_package_folder_with_relative_imports(tmp_path, forget_modules):
    write(tmp_path / "plugins" / "wirecodec" / "__init__.py", "from .codec import WireCodec\n")
    write(tmp_path / "plugins" / "wirecodec" / "frames.py", "MAGIC = b'\\xca\\xfe'\n")
    write(
        tmp_path / "plugins" / "wirecodec" / "codec.py",
        codec_source(cls="WireCodec", name="wire", extra="\nfrom .frames import MAGIC\nWireCodec.magic = MAGIC\n"),
    )
    cls = load_codec_class("plugins/wirecodec:WireCodec", tmp_path)
    assert cls.name == "wire" and cls.magic == b"\xca\xfe"


def test_importable_module(tmp_path, monkeypatch, forget_modules):
    package = unique("mb_test_pkg")
    write(tmp_path / package / "__init__.py", "")
    write(tmp_path / package / "wire.py", codec_source(cls="ModuleCodec", name="module", has_request_id="False"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = load_codec_class(f"{package}.wire:ModuleCodec")
    assert cls.name == "module" and cls.has_request_id is False
    assert cls.__module__ == f"{package}.wire"


def test_builtin_codec_from_the_repository():
    cls = load_codec_class("codecs/awesomerpc.py:AwesomeRpcCodec", ROOT)
    assert cls.name == "awesomerpc" and cls.has_request_id is True


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch, forget_modules):
    """A fake installed distribution offering codecs through the metabridge.codecs entry points."""
    site = tmp_path / "site"
    module = unique("mb_plugin")
    write(site / f"{module}.py", codec_source(cls="PluginCodec", name="plugin") + "\nNOT_A_CLASS = 42\n")
    dist = site / f"{module}-1.0.dist-info"
    write(dist / "METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    broken = unique("mb_plugin_broken")
    write(site / f"{broken}.py", "raise RuntimeError('plugin is misconfigured')\n")
    write(
        dist / "entry_points.txt",
        f"""\
        [{ENTRY_POINT_GROUP}]
        plugin-codec = {module}:PluginCodec
        plugin-broken = {broken}:Anything
        plugin-not-a-class = {module}:NOT_A_CLASS

        [some.other.group]
        elsewhere = {module}:PluginCodec
        """,
    )
    monkeypatch.syspath_prepend(str(site))
    return module


def test_entry_point(installed_plugin):
    cls = load_codec_class("plugin-codec")
    assert cls.name == "plugin" and cls.__module__ == installed_plugin


def test_entry_point_that_fails_to_load(installed_plugin):
    message = load_error("plugin-broken")
    assert "'plugin-broken'" in message and "failed to load" in message
    assert "RuntimeError: plugin is misconfigured" in message


def test_entry_point_that_is_not_a_class(installed_plugin):
    assert "expected a class, got int" in load_error("plugin-not-a-class")


def test_unknown_entry_point(installed_plugin):
    message = load_error("elsewhere")  # offered, but in another group
    assert "'elsewhere'" in message and f"{ENTRY_POINT_GROUP!r} entry-point group" in message
    assert "file.py:Class" in message  # says what else to write


# ---- references that do not ------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = load_error("codecs/nope.py:Nope", tmp_path)
    assert message.startswith("'codecs/nope.py:Nope': no such file or folder:")
    assert str(tmp_path / "codecs" / "nope.py") in message


def test_folder_without_init(tmp_path):
    (tmp_path / "loose").mkdir()
    assert "has no __init__.py" in load_error("loose/:X", tmp_path)


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        ("import mb_dependency_that_is_not_installed\n", "ModuleNotFoundError: No module named 'mb_dependency_that_is_not_installed'"),
        ("raise ValueError('bad table')\n", "ValueError: bad table"),
        ("def broken(:\n", "SyntaxError"),
    ],
)
def test_import_error_inside_the_codec(tmp_path, forget_modules, body, cause):
    path = write(tmp_path / "failing.py", body)
    message = load_error("failing.py:X", tmp_path)
    assert message.startswith(f"'failing.py:X': importing {path} failed:")
    assert cause in message


def test_a_fixed_file_loads_after_a_failed_import(tmp_path, forget_modules):
    path = write(tmp_path / "flaky.py", "raise ImportError('not yet')\n")
    load_error("flaky.py:GoodCodec", tmp_path)
    write(path, codec_source())
    assert load_codec_class("flaky.py:GoodCodec", tmp_path).name == "good"


def test_module_that_cannot_be_imported():
    message = load_error("mb_no_such_package.wire:Codec")
    assert "cannot import module 'mb_no_such_package.wire'" in message and "ModuleNotFoundError" in message


def test_missing_class_name(tmp_path):
    assert "missing class name after ':'" in load_error("good.py:", tmp_path)


def test_missing_attribute(tmp_path, forget_modules):
    write(tmp_path / "good.py", codec_source())
    message = load_error("good.py:Absent", tmp_path)
    assert message == "'good.py:Absent': good.py has no attribute 'Absent'"


@pytest.mark.parametrize(("attr", "kind"), [("make_codec", "function"), ("INSTANCE", "GoodCodec"), ("NAME", "str")])
def test_not_a_class(tmp_path, forget_modules, attr, kind):
    write(tmp_path / "things.py", codec_source(extra="\ndef make_codec():\n    return GoodCodec()\n\nINSTANCE = GoodCodec()\nNAME = 'x'\n"))
    assert load_error(f"things.py:{attr}", tmp_path).endswith(f"expected a class, got {kind}")


def test_missing_methods(tmp_path, forget_modules):
    write(
        tmp_path / "duck.py",
        """\
        class Duck:
            has_request_id = True

            def decode(self, buffer, metadata):
                return None

            encode = "not callable"
        """,
    )
    message = load_error("duck.py:Duck", tmp_path)
    assert message.endswith("Duck does not implement the codec contract: missing encode, on_error")


def test_duck_typed_class_with_every_method_is_accepted():
    class Duck:
        has_request_id = False

        def decode(self, buffer, metadata): ...

        def encode(self, metadata, mutation): ...

        def on_error(self, metadata, error): ...

        def heartbeat_reply(self, metadata): ...

    check_codec_class(Duck, "inline:Duck")  # no error


def test_methods_not_overridden(tmp_path, forget_modules):
    write(
        tmp_path / "lazy.py",
        """\
        from metabridge.sdk.codec import Codec


        class Lazy(Codec):
            def decode(self, buffer, metadata):
                return None
        """,
    )
    assert load_error("lazy.py:Lazy", tmp_path).endswith("Lazy does not override encode, on_error")


@pytest.mark.parametrize("value", ["1", "None", "'yes'"])
def test_has_request_id_not_a_bool(tmp_path, forget_modules, value):
    write(tmp_path / "flagged.py", codec_source(has_request_id=value))
    assert load_error("flagged.py:GoodCodec", tmp_path).endswith("GoodCodec.has_request_id must be True or False")


# ---- load_codecs -----------------------------------------------------------------------------------


def config_with_codecs(tmp_path: Path, codecs: dict[str, str]):
    raw = {
        "codecs": {name: {"ref": ref} for name, ref in codecs.items()},
        "listeners": [{"name": "front", "port": 15000, "codec": next(iter(codecs)), "routes": []}],
        "clusters": [],
    }
    return parse(raw, str(tmp_path / "metabridge.yaml"), tmp_path)


def test_load_codecs_loads_every_codec_relative_to_the_config(tmp_path, forget_modules):
    write(tmp_path / "one.py", codec_source(name="one"))
    write(tmp_path / "two.py", codec_source(cls="Two", name="two"))
    loaded = load_codecs(config_with_codecs(tmp_path, {"first": "one.py:GoodCodec", "second": "./two.py:Two"}))
    assert {name: cls.name for name, cls in loaded.items()} == {"first": "one", "second": "two"}


def test_load_codecs_names_the_config_entry(tmp_path, forget_modules):
    write(tmp_path / "one.py", codec_source())
    config = config_with_codecs(tmp_path, {"fine": "one.py:GoodCodec", "broken": "missing.py:Codec"})
    with pytest.raises(CodecLoadError) as info:
        load_codecs(config)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'metabridge.yaml'}: codecs.broken.ref: 'missing.py:Codec': no such file or folder")


# ---- loading a file again after it changed (codec reload) -----------------------------------------


def modules_of(path: Path) -> list[str]:
    """The registry's modules for a file or folder in sys.modules (a package's submodules too)."""
    from metabridge.registry import _module_prefix

    return sorted(name for name in sys.modules if name.startswith(_module_prefix(path.resolve())))


def test_a_changed_file_is_imported_again_and_its_old_module_dropped(tmp_path, forget_modules):
    path = write(tmp_path / "versioned.py", codec_source(name="aaa"))
    old = load_codec_class("versioned.py:GoodCodec", tmp_path)
    old_codec = old()
    write(path, codec_source(name="bbb"))  # same size, same second: no stale bytecode may run
    new = load_codec_class("versioned.py:GoodCodec", tmp_path)
    assert (old.name, new.name) == ("aaa", "bbb") and new is not old
    assert modules_of(path) == [new.__module__], "only the current content stays imported"
    # The old class lives on in what holds it (an open connection's codecs) and still works.
    assert old_codec.on_error(None, type("E", (), {"message": "x"})()) == b"error:x"
    assert load_codec_class("./versioned.py:GoodCodec", tmp_path) is new, "unchanged content: the same class"


def test_reloading_many_times_keeps_one_module_per_file(tmp_path, forget_modules):
    path = tmp_path / "churn.py"
    for i in range(20):
        write(path, codec_source(name=f"v{i}"))
        assert load_codec_class("churn.py:GoodCodec", tmp_path).name == f"v{i}"
    assert len(modules_of(path)) == 1


@pytest.mark.parametrize(
    ("body", "cause"),
    [("def broken(:\n", "SyntaxError"), ("import mb_not_installed_either\n", "ModuleNotFoundError"), ("raise RuntimeError('half-written')\n", "RuntimeError: half-written")],
)
def test_a_broken_rewrite_is_refused_and_the_old_module_stays(tmp_path, forget_modules, body, cause):
    path = write(tmp_path / "flaky2.py", codec_source(name="good"))
    old = load_codec_class("flaky2.py:GoodCodec", tmp_path)
    write(path, body)
    message = load_error("flaky2.py:GoodCodec", tmp_path)
    assert message.startswith(f"'flaky2.py:GoodCodec': importing {path} failed: ") and cause in message
    assert modules_of(path) == [old.__module__]
    write(path, codec_source(name="good"))  # put back as it was: the module still imported
    assert load_codec_class("flaky2.py:GoodCodec", tmp_path) is old


def test_a_changed_package_folder_is_imported_again_with_its_submodules(tmp_path, forget_modules):
    folder = tmp_path / "pkgcodec"
    write(folder / "__init__.py", "from .codec import WireCodec\n")
    write(folder / "codec.py", codec_source(cls="WireCodec", name="one"))
    old = load_codec_class("./pkgcodec:WireCodec", tmp_path)
    write(folder / "codec.py", codec_source(cls="WireCodec", name="two"))
    new = load_codec_class("./pkgcodec:WireCodec", tmp_path)
    assert (old.name, new.name) == ("one", "two")
    for i in range(5):  # rewritten within a second, the same size: never a stale .pyc
        write(folder / "codec.py", codec_source(cls="WireCodec", name=f"v{i}"))
        new = load_codec_class("./pkgcodec:WireCodec", tmp_path)
        assert new.name == f"v{i}"
    package = new.__module__.rpartition(".")[0]
    assert modules_of(folder) == [package, f"{package}.codec"], "only the current package and its submodule stay imported"


def test_a_missing_class_suggests_the_nearest(tmp_path, forget_modules):
    write(tmp_path / "good.py", codec_source())
    assert load_error("good.py:GoodCodc", tmp_path) == "'good.py:GoodCodc': good.py has no attribute 'GoodCodc' (did you mean 'GoodCodec'?)"


def test_load_codecs_names_the_line_of_the_reference(tmp_path, forget_modules):
    from metabridge.config.model import load

    path = tmp_path / "metabridge.yaml"
    path.write_text("codecs:\n  broken:\n    ref: missing.py:Codec\nlisteners: [{name: l, port: 15000, codec: broken, routes: []}]\nclusters: []\n")
    with pytest.raises(CodecLoadError) as info:
        load_codecs(load(path))
    assert str(info.value) == f"{path}: codecs.broken.ref: 'missing.py:Codec': no such file or folder: {tmp_path / 'missing.py'} (line 3)"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("codec.py:C", "/base/codec.py"), ("./d:C", "/base/d"), ("sub/d:C", "/base/sub/d"), ("/abs/x.py:C", "/abs/x.py"), ("pkg.mod:C", None), ("entry-name", None)],
)
def test_reference_path(ref, expected):
    from metabridge.registry import reference_path

    assert reference_path(ref, "/base") == (None if expected is None else Path(expected))


def test_a_changed_filter_file_is_imported_again(tmp_path, forget_modules):
    from metabridge.registry import load_filter_class

    source = "from metabridge.sdk.filter import Filter\n\n\nclass Tag(Filter):\n    tag = {tag!r}\n"
    path = write(tmp_path / "tag.py", source.format(tag="old"))
    old = load_filter_class("tag.py:Tag", tmp_path)
    write(path, source.format(tag="new"))
    assert (old.tag, load_filter_class("tag.py:Tag", tmp_path).tag) == ("old", "new")
