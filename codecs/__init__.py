"""The built-in codecs, installed as ``metabridge.codecs`` (awesomerpc, dubbo, thrift).

Import them as ``metabridge.codecs.<name>`` or name them in a config (``ref: dubbo``). This folder
is never a top-level ``codecs``: the standard library's module of that name is always the one
imported (tests/unit/test_package.py checks it).
"""
