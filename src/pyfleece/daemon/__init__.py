"""The storage daemon: qemu-storage-daemon's command line, QMP/HMP, jobs and NBD."""
