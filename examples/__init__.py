"""Example peers for the protocols metabridge ships codecs for."""
