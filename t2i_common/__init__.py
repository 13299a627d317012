"""What both daemons share: the public API's request schema, its error vocabulary and config loading.

Nothing here imports torch or diffusers, so the gateway can use it without the orchestrator extra.
"""

__version__ = "0.1.0"
