"""streamrpc: an example streaming RPC protocol (protocol.py), its codec (codec.py), a backend
(server.py) and a blocking client (client.py).

This folder is also a codec package: a config loads the codec with ``ref: <this folder>:StreamRpcCodec``
(relative to the config file's folder; see streamrpc.yaml).
"""

from .codec import StreamRpcCodec

__all__ = ["StreamRpcCodec"]
