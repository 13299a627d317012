"""``t2i``: a command-line client for a t2i gateway (or any Livepeer AI text-to-image gateway)."""
