"""Run at start-up by the daemons that the end-to-end tests launch (``tests/processes.py`` puts this folder
on their ``PYTHONPATH`` and names the packages to watch in ``T2I_BLOCKBUSTER``): blockbuster over the
project's packages, as in the tests' own process. A blocking call on a daemon's event loop raises there;
the error lands in the daemon's log, which the tests' ``blockbuster`` fixture reads."""

import os

if os.environ.get("T2I_BLOCKBUSTER"):
    from blockbuster import BlockBuster

    BlockBuster(os.environ["T2I_BLOCKBUSTER"].split(",")).activate()
