"""awesomerpc example peers: ``server`` (a backend) and ``client`` (an asyncio client library)."""
