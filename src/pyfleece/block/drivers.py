"""Imports every driver module, so that each registers itself with the registry."""

import pyfleece.block.nbd  # noqa: F401  (registers the nbd driver)
from pyfleece.block import fault, file, memory, null, raw
from pyfleece.block.qcow2 import driver as qcow2_driver  # noqa: F401  (registers qcow2)

__all__ = ["fault", "file", "memory", "null", "raw"]
