"""Names the rendered Envoy config and the bridge must agree on (kept free of heavy imports).

CLUSTER_HEADER: request header on each CONNECT naming the target cluster.
UPSTREAM_HOST_HEADER / RESPONSE_FLAGS_HEADER: response headers saying which endpoint a tunnel
reached and Envoy's response flags (why a 503 happened: NC, UF, UO, UH ...).
LISTENER_METADATA_KEY: gRPC initial-metadata key naming the listener a stream belongs to.
BRIDGE_CLUSTER: Envoy's cluster of bridge workers.
HOST_OVERRIDE_HEADER: see below.
HASH_KEY_HEADER: optional CONNECT header whose value is the hash key for RING_HASH / MAGLEV
clusters (a tunnel without it gets a random host).
"""

CLUSTER_HEADER = "x-metabridge-cluster"
UPSTREAM_HOST_HEADER = "x-metabridge-upstream-host"
RESPONSE_FLAGS_HEADER = "x-metabridge-response-flags"
LISTENER_METADATA_KEY = "x-metabridge-listener"
BRIDGE_CLUSTER = "metabridge_bridge"
HASH_KEY_HEADER = "x-metabridge-hash-key"
# CONNECT header naming the endpoint ("ip:port") a tunnel should reach; Envoy's override_host
# load-balancing policy sends the tunnel there when that host is in the cluster (whatever its
# health), else the cluster's lb_policy picks; a failed connect is retried on another host.
HOST_OVERRIDE_HEADER = "x-metabridge-host"
