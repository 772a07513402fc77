"""streamrpc: an example streaming RPC protocol (protocol.py), its codec (codec.py), a backend
(server.py) and a blocking client (client.py).

This folder is also a codec package: a config loads the codec with
``ref: ../examples/streamrpc:StreamRpcCodec`` (relative to the config file's folder).
"""

from .codec import StreamRpcCodec

__all__ = ["StreamRpcCodec"]
