"""metabridge's benchmark: one command that measures every path back to back.

    python -m bench run [--quick] [--out DIR]

Paths: straight to the backend, Envoy ``tcp_proxy``, Envoy's native ``generic_proxy`` with its
Dubbo codec, and metabridge (Envoy + bridge) for awesomerpc and Dubbo. See docs/performance.md.
"""
