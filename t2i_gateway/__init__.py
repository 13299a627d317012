"""``t2i-gateway``: the public entry point in front of the orchestrators."""
