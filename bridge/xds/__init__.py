"""Routes from an xDS server (RDS): the stream client (client.py) and the translation of
envoy.config.route.v3.RouteConfiguration into metabridge routes (translate.py)."""
