"""Imports every driver module, so that each registers itself with the registry.

The registry imports drivers lazily, on first use (``registry._MODULES``); import this
module when every driver must be registered at once (the registry's table is checked
against it by ``tests/unit/test_registry_lazy.py``).
"""

import pyfleece.block.nbd  # noqa: F401  (registers the nbd driver)
from pyfleece.block import fault, file, memory, null, raw
from pyfleece.block.qcow2 import driver as qcow2_driver  # noqa: F401  (registers qcow2)

__all__ = ["fault", "file", "memory", "null", "raw"]
