"""QEMU's monitors: QMP (JSON, for programs) and HMP (text, for people), as qemu-storage-daemon
speaks them, so qemu.qmp, libvirt-era tools and scripts written for QEMU work unchanged.

Package map (docs/monitor.md has the decisions and measurements)::

    options.py      --chardev / --monitor command-line values
    server.py       MonitorServer: listeners, one session per connection, clean shutdown
    qmp.py          a QMP session: greeting, negotiation, replies and events (bounded queue)
    readline.py     an HMP session: banner, prompt, echo, line editing
    jsonstream.py   QMP input framing (QEMU's lexer rules, bounds)
    jsonvalue.py    JSON values: QEMU's parser messages, iterative encoding
    dispatch.py     CommandRegistry + Dispatcher: the one command lock, errors -> replies
    schema.py       QAPI-style types and argument validation with QEMU's messages
    qapi/           the described commands and types (BlockdevOptions, backup, jobs, NBD...)
    hmp.py          the HMP table and QEMU's argument syntax
    core.py         the framework's own commands (qmp_capabilities, query-*, quit, help...)
    qemuio.py       a qemu-io interpreter over a block node (for HMP ``qemu-io``)
    client.py       small synchronous QMP/HMP clients (tests, demo)

The daemon plugs in::

    dispatcher = core.create_dispatcher()
    dispatcher.qmp.register("blockdev-add", handler)      # handler(ctx, args) -> JSON-able
    dispatcher.hmp.register("drive_del", "id:B", "device", "remove a drive", hmp_handler)
    dispatcher.hmp.info.register("block", "", "", "show the block devices", info_block)
    server = MonitorServer(dispatcher, ctx, monitors, chardevs)   # ctx: dispatch.MonitorContext
    server.start(); ...; server.stop()
"""
