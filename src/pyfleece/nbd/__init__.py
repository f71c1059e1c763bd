"""NBD: the protocol codec, server, sessions, client and the qemu-nbd-like tool."""
