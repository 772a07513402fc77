"""The Thrift codec: binary and compact protocols over framed or unframed transport."""

from .codec import ERROR_CODES, ThriftCodec

__all__ = ["ERROR_CODES", "ThriftCodec"]
