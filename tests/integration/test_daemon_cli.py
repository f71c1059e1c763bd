"""``pyfleece daemon``'s command line, start-up and shutdown, as a user meets them.

Bad options exit 1 with the offending value named and leave no socket and no pidfile; the
pidfile appears only once every socket answers; a killed daemon's stale sockets are replaced
and a live daemon's are not stolen; SIGTERM, SIGINT, QMP ``quit`` and HMP ``quit`` all stop
the daemon cleanly (exit 0, NBD clients disconnected, the job cancelled with its events, the
guest's writes in the image, nothing left behind); TLS exports, max-connections, --drive
options and --daemonize work as qemu-storage-daemon users expect.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from pyfleece.daemon.args import _OPTIONS, USAGE
from pyfleece.daemon.commands.nbd import tcp_port
from pyfleece.monitor.client import HmpConnection, QmpConnection
from tests.conftest import require_tool
from tests.integration.nbd_client_peers import make_certs
from tests.integration.test_daemon_support import (
    HMP_ARGS,
    QMP_ARGS,
    daemon_env,
    make_images,
    serve,
)
from tests.support import PYFLEECE, qemu_io, run, wait_until

DAEMON = [*PYFLEECE, "daemon"]


def leftovers(workdir: Path) -> list[str]:
    """Sockets and pidfiles (and their temporary files) left in a directory."""
    return sorted(
        p.name
        for p in workdir.iterdir()
        if p.suffix in (".sock", ".tmp") or p.name in ("pid", "pid2")
    )


def test_help_names_every_option() -> None:
    done = run([*DAEMON, "--help"])
    assert done.stdout == USAGE
    for option in [*_OPTIONS, "pidfile", "daemonize", "help", "version"]:
        assert f"--{option}" in USAGE, option
    assert run([*DAEMON, "--version"]).stdout.startswith("pyfleece daemon ")


#: (arguments, what stderr must say): each exits 1 and leaves nothing behind.
BAD: list[tuple[list[str], str]] = [
    (["--bogus"], "unrecognized option '--bogus'"),
    (["stray"], "stray: Unexpected argument"),
    (["--blockdev"], "option '--blockdev' requires an argument"),
    (["--blockdev", "driver=raw"], "Parameter 'file' is missing"),
    (["--blockdev", '{"driver": "raw"'], "Invalid JSON"),
    (["--blockdev", "driver=null-co,node-name=1x"], "Invalid node-name: '1x'"),
    (["--nbd-server", "addr.type=unix"], "Parameter 'addr.path' is missing"),
    (["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"], "Parameter 'addr.port' is missing"),
    (["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=notaport"],
     "address resolution failed for 127.0.0.1:notaport"),
    (["--nbd-server", "addr.type=unix,addr.path=n.sock", "--export",
      "type=nbd,id=e,node-name=nosuch"], "Cannot find device='' nor node-name='nosuch'"),
    (["--object", "tls-creds-x509,id=t,dir=/nonexistent,endpoint=server"],
     "Unable to access credentials /nonexistent/ca-cert.pem"),
    (["--object", "tls-creds-x509,id=t,endpoint=server"], "Missing 'dir' property value"),
    (["--chardev", "socket,path=a.sock,server=on,wait=off,id=m",
      "--chardev", "socket,path=b.sock,server=on,wait=off,id=m"], "Duplicate ID 'm' for chardev"),
    ([*QMP_ARGS, "--monitor", "chardev=qmp0"], "chardev 'qmp0' is already used"),
    ([*QMP_ARGS, "--chardev", "socket,path=nodir/h.sock,server=on,wait=off,id=h",
      "--monitor", "chardev=h"], "Failed to bind socket to nodir/h.sock"),
    ([*QMP_ARGS, "--nbd-server", "addr.type=unix,addr.path=n.sock", "--pidfile", "nodir/pid"],
     "cannot create PID file: Could not create 'nodir/pid': No such file or directory"),
    (["--drive", "file=d.raw,id=a,if=none", "--drive", "file=d.raw,id=a,if=none"],
     "Duplicate ID 'a' for drive"),
    (["--drive", "file=d.raw,if=ide"], "if=ide is not supported"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_options_fail_cleanly(tmp_path: Path, args: list[str], message: str) -> None:
    make_images(tmp_path, ("d.raw", "raw", "1M"))
    done = subprocess.run([*DAEMON, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=20, env=daemon_env())  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert leftovers(tmp_path) == []


def test_port_may_be_a_service_name() -> None:
    assert tcp_port("localhost", "nbd") == 10809
    assert tcp_port("localhost", "0") == 0


def _quit_qmp(workdir: Path, proc: subprocess.Popen[bytes]) -> None:
    with QmpConnection(str(workdir / "qmp2.sock")) as qmp:
        qmp.negotiate()
        assert qmp.execute("quit")["return"] == {}


def _quit_hmp(workdir: Path, proc: subprocess.Popen[bytes]) -> None:
    with HmpConnection(str(workdir / "hmp.sock")) as hmp:
        hmp.sock.sendall(b"quit\n")
        wait_until(lambda: hmp.sock.recv(4096) == b"", 10, "the HMP connection to close")


STOPS: dict[str, Callable[[Path, subprocess.Popen[bytes]], None]] = {
    "SIGTERM": lambda d, p: p.send_signal(signal.SIGTERM),
    "SIGINT": lambda d, p: p.send_signal(signal.SIGINT),
    "qmp-quit": _quit_qmp,
    "hmp-quit": _quit_hmp,
}


@pytest.mark.parametrize("how", list(STOPS))
def test_clean_shutdown(tmp_path: Path, how: str) -> None:
    """While a client is connected and a fleecing job runs, each way of stopping exits 0,
    disconnects the client, cancels the job (with its events), flushes the guest's data
    into the image and removes every socket and the pidfile."""
    make_images(tmp_path, ("disk.qcow2", "qcow2", "4M"), ("fleece.qcow2", "qcow2", "4M"))
    args = ["--drive", "file=disk.qcow2,id=disk0,if=none",
            "--drive", "file=fleece.qcow2,id=fleece0,if=none,backing=disk0",
            "--chardev", "socket,path=qmp2.sock,server=on,wait=off,id=q2", "--monitor", "q2",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=live,node-name=disk0,writable=on"]  # fmt: skip
    with serve("ours", tmp_path, args, monitors=[*QMP_ARGS, *HMP_ARGS]) as daemon:
        daemon.ok("blockdev-backup", device="disk0", target="fleece0", sync="none")
        client = nbd.NBD()
        client.connect_uri(daemon.uri("disk0"))
        client.pwrite(b"\x5a" * 65536, 1 << 20)  # no flush: shutdown must flush it
        STOPS[how](tmp_path, daemon.proc)
        assert daemon.proc.wait(20) == 0
        names = [e["event"] for e in daemon.events_until_closed()]
        assert names.index("BLOCK_EXPORT_DELETED") < names.index("BLOCK_JOB_CANCELLED")
        with pytest.raises(nbd.Error):
            client.pread(512, 0)
    assert leftovers(tmp_path) == []
    qemu_io(str(tmp_path / "disk.qcow2"), "read -P 0x5a 1M 64k", fmt="qcow2", read_only=True)
    run(["qemu-img", "check", "-q", str(tmp_path / "disk.qcow2")])
    run(["qemu-img", "check", "-q", str(tmp_path / "fleece.qcow2")])


def test_pidfile_means_ready_and_sockets_are_never_stolen(tmp_path: Path) -> None:
    make_images(tmp_path, ("d.raw", "raw", "1M"))
    args = ["--drive", "file=d.raw,format=raw,id=d0,if=none",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=e0,node-name=d0"]  # fmt: skip
    with serve("ours", tmp_path, args, monitors=[*QMP_ARGS, *HMP_ARGS]) as first:
        # Everything answers the moment the pidfile exists.
        with HmpConnection(str(tmp_path / "hmp.sock")) as hmp:
            assert "d0" in hmp.command("info block")
        qemu_io(first.uri("d0"), "read -P 0 0 64k", read_only=True)
        # A second daemon on the same paths is refused, and takes nothing away.
        for clash in (QMP_ARGS, ["--nbd-server", "addr.type=unix,addr.path=nbd.sock"]):
            done = subprocess.run([*DAEMON, *clash, "--pidfile", "pid2"], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=20,
                                  env=daemon_env())  # fmt: skip
            assert done.returncode == 1
            assert "Address already in use" in done.stderr
            assert not (tmp_path / "pid2").exists()
        assert first.ok("query-block")[0]["device"] == "d0"
        qemu_io(first.uri("d0"), "read -P 0 0 64k", read_only=True)
        first.proc.kill()
        first.proc.wait(10)
    assert {"qmp.sock", "hmp.sock", "nbd.sock"} <= set(leftovers(tmp_path))
    (tmp_path / "pid").unlink()
    with serve("ours", tmp_path, args, monitors=[*QMP_ARGS, *HMP_ARGS]) as again:
        qemu_io(again.uri("d0"), "read -P 0 0 64k", read_only=True)


def test_tls_export_and_max_connections(tmp_path: Path) -> None:
    require_tool("nbdinfo")
    certs = make_certs(tmp_path / "certs")
    make_images(tmp_path, ("d.raw", "raw", "1M"))
    args = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={certs['server']}",
            "--blockdev", "driver=raw,node-name=disk,file.driver=file,file.filename=d.raw",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock,tls-creds=tls0,max-connections=1",
            "--export", "type=nbd,id=e0,node-name=disk,writable=on"]  # fmt: skip
    with serve("ours", tmp_path, args) as daemon:
        secure = f"nbds+unix:///disk?socket={tmp_path}/nbd.sock&tls-certificates={certs['client']}"
        info = json.loads(run(["nbdinfo", "--json", secure]).stdout)
        assert info["exports"][0]["export-size"] == 1 << 20
        plain = run(["nbdinfo", daemon.uri("disk")], check=False)
        assert plain.returncode != 0
        creds = f"tls-creds-x509,id=c0,endpoint=client,dir={certs['client']}"
        image = (f"driver=nbd,server.type=unix,server.path={tmp_path}/nbd.sock,export=disk,"
                 "tls-creds=c0,tls-hostname=localhost")  # fmt: skip
        out = run(["qemu-io", "--object", creds, "--image-opts", image,
                   "-c", "write -P 0x42 0 4k", "-c", "read -P 0x42 0 4k"]).stdout  # fmt: skip
        assert "verification failed" not in out and "read 4096/4096" in out
        # max-connections=1: a second client waits in the backlog until the first leaves.
        first = nbd.NBD()
        first.set_uri_allow_local_file(True)
        first.connect_uri(secure)
        waiting = socket.socket(socket.AF_UNIX)
        waiting.connect(str(tmp_path / "nbd.sock"))
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(8)  # no greeting while the first client holds the only slot
        first.shutdown()
        waiting.settimeout(10)
        assert waiting.recv(8) == b"NBDMAGIC"
        waiting.close()
        creds_args = {"qom-type": "tls-creds-x509", "endpoint": "server"}
        assert daemon.ok("object-add", id="tls1", dir=str(certs["server"]), **creds_args) == {}
        assert daemon.error("object-add", id="tls2", dir="/nonexistent", **creds_args)[1] == (
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
        )
        assert daemon.ok("object-del", id="tls1") == {}
        assert daemon.error("object-del", id="tls1")[1] == "object 'tls1' not found"


def test_drive_options(tmp_path: Path) -> None:
    """--drive: format probed when absent, backing= overrides the image's backing with a
    drive, readonly=on refuses writes; --blockdev in keyval and JSON open the same node."""
    make_images(tmp_path, ("base.qcow2", "qcow2", "4M"), ("top.qcow2", "qcow2", "4M"),
                ("r.raw", "raw", "4M"))  # fmt: skip
    qemu_io(str(tmp_path / "base.qcow2"), "write -P 0x33 0 64k", fmt="qcow2")
    args = ["--drive", "file=base.qcow2,id=base0,if=none,readonly=on",
            "--drive", "file=top.qcow2,id=top0,if=none,backing=base0",
            "--blockdev", "driver=raw,node-name=kv,file.driver=file,file.filename=r.raw",
            "--blockdev", json.dumps({"driver": "raw", "node-name": "js", "file": {
                "driver": "file", "filename": "r.raw"}})]  # fmt: skip
    with serve("ours", tmp_path, args) as daemon:
        drives = {d["device"]: d["inserted"] for d in daemon.ok("query-block")}
        assert drives["base0"]["drv"] == "qcow2" and drives["base0"]["ro"] is True
        assert drives["top0"]["backing_file"] == "base.qcow2"
        assert drives["top0"]["backing_file_depth"] == 1
        assert drives["top0"]["image"]["backing-image"]["filename"] == "base.qcow2"
        assert "read 65536/65536" in daemon.hmp('qemu-io top0 "read -P 0x33 0 64k"')
        assert daemon.hmp('qemu-io base0 "write 0 512"') == "Block node is read-only\n"
        nodes = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes", flat=True)}
        nodes["kv"].pop("node-name"), nodes["js"].pop("node-name")
        assert nodes["kv"] == nodes["js"]


def test_daemonize(tmp_path: Path) -> None:
    make_images(tmp_path, ("d.raw", "raw", "1M"))
    node = "driver=raw,node-name=d0,file.driver=file,file.filename=d.raw"
    argv = [*DAEMON, "--daemonize", *QMP_ARGS, "--blockdev", node, "--pidfile", "pid"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          env=daemon_env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    pid = int((tmp_path / "pid").read_text())  # ready before the parent returned
    try:
        with QmpConnection(str(tmp_path / "qmp.sock")) as qmp:
            qmp.negotiate()
            assert qmp.execute("query-named-block-nodes")["return"][0]["node-name"] == "d0"
            qmp.execute("quit")
        wait_until(lambda: not (tmp_path / "pid").exists(), 20, "the daemon to stop")
    finally:
        if (tmp_path / "pid").exists():
            os.kill(pid, signal.SIGKILL)
    failed = subprocess.run([*DAEMON, "--daemonize", "--blockdev", "driver=raw"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30,
                            env=daemon_env())  # fmt: skip
    assert failed.returncode == 1
    assert "Parameter 'file' is missing" in failed.stderr
