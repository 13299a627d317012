"""Run at start-up by the daemons that the end-to-end tests launch (``tests/processes.py`` puts this folder
on their ``PYTHONPATH``): blockbuster over the project's packages, as in the tests' own process. A
blocking call on a daemon's event loop raises there; the error lands in the daemon's log, which the
tests' ``blockbuster`` fixture reads."""

from blockbuster import BlockBuster

# The same packages as PRODUCT in tests/conftest.py.
BlockBuster(["t2i_common", "t2i_gateway", "t2i_orchestrator", "t2i_cli", "discovery", "metrics"]).activate()
