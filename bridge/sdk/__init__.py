"""The codec and filter SDK: the contracts between metabridge and its plugins."""
