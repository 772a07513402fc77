"""Real protocol peers (servers and clients) that tests run against."""
