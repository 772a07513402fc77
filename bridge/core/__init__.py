"""The proxy core: connections, requests, the filter chain, the router and the upstream pool. Sans-IO: bytes and timer events in, bytes and actions out."""
