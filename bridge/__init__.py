"""metabridge: a MetaProtocol layer-7 proxy with Python codecs and a stock Envoy."""
