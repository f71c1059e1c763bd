"""The daemon's QMP and HMP commands, one module per family, registered on a dispatcher."""

from __future__ import annotations

from pyfleece.monitor.dispatch import Dispatcher


def register_all(dispatcher: Dispatcher) -> None:
    from pyfleece.daemon.commands import block, jobs, nbd

    block.register(dispatcher)
    jobs.register(dispatcher)
    nbd.register(dispatcher)
