"""The config file (schema, model) and the Envoy bootstrap rendered from it."""
