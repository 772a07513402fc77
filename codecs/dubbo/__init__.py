"""Dubbo2 protocol (Hessian2 serialization) codec for metabridge.

Load it with the reference ``codecs/dubbo:DubboCodec``; see docs/codecs/dubbo.md.
"""

from .codec import DEFAULT_MAX_BODY_SIZE, ERROR_STATUS, DubboBodyError, DubboCodec

__all__ = ["DEFAULT_MAX_BODY_SIZE", "ERROR_STATUS", "DubboBodyError", "DubboCodec"]
