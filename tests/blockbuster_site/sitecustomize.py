"""Run at start-up by the daemons that the end-to-end tests launch (``tests/processes.py`` puts this folder
on their ``PYTHONPATH`` and names the packages to watch in ``T2I_BLOCKBUSTER``): blockbuster over the
project's packages, as in the tests' own process. A blocking call on a daemon's event loop raises there,
and every such error is announced in the daemon's log as it is raised (whatever the code that catches it
logs: perhaps only ``str(exc)``, perhaps nothing), which the tests' ``blockbuster`` fixture reads."""

import os
import sys

if os.environ.get("T2I_BLOCKBUSTER"):
    from blockbuster import BlockBuster
    from blockbuster import blockbuster as _blockbuster

    _init = _blockbuster.BlockingError.__init__

    def _announced(self: Exception, func: str) -> None:
        _init(self, func)  # type: ignore[arg-type]
        sys.stderr.write(f"BlockingError: blocking call to {func} (announced as raised)\n")  # stderr may block
        sys.stderr.flush()

    _blockbuster.BlockingError.__init__ = _announced  # type: ignore[method-assign]
    BlockBuster(os.environ["T2I_BLOCKBUSTER"].split(",")).activate()
