"""Built-in filters, registered by name."""
