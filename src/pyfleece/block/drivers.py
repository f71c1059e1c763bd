"""Imports every driver module, so that each registers itself with the registry."""

from pyfleece.block import fault, file, memory, null, raw

__all__ = ["fault", "file", "memory", "null", "raw"]
