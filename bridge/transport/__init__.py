"""Transports that drive the proxy core: the ext_proc gRPC service (and its HTTP/2 server)."""
