"""pyfleece: a storage daemon with point-in-time snapshot export over NBD (image fleecing)."""

__version__ = "0.1.0"
