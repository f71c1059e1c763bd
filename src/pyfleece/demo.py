"""``make demo``: image fleecing end to end, on an embedded default.

1. Create a 256 MiB disk with content and start ``pyfleece daemon`` on it (QMP, HMP, NBD).
2. Start a simulated guest that keeps writing the disk through a writable NBD export.
3. Take a point-in-time snapshot with the 2013 recipe: ``pyfleece img create`` the temporary
   qcow2, HMP ``drive_add backing=ide0-hd0,...``, QMP ``blockdev-backup sync=none`` and
   ``nbd-server-add``. The guest is held for the instant of the snapshot only, so that the
   disk's checksum at that instant can be taken for the final check.
4. Pull the snapshot over NBD while the guest goes on writing, with progress.
5. Check the pulled image equals the disk at the snapshot instant; finish with
   ``block-job-complete``, ``drive_del target0``, ``rm BACKUP.qcow2``; print a report.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyfleece.monitor.client import HmpConnection, QmpConnection
from pyfleece.nbd.client import NbdClient

MiB = 1 << 20
DISK_SIZE = 256 * MiB
PULL_CHUNK = 2 * MiB
STARTUP_TIMEOUT = 20.0
#: Bytes per second the simulated guest writes.
GUEST_RATE = 64 * MiB


@dataclass
class Guest:
    """Writes random extents to the live disk until stopped; can be held for an instant."""

    uri: str
    size: int
    writes: int = 0
    bytes_written: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    hold: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        rng = random.Random(2013)
        with NbdClient.connect(self.uri) as disk:
            while not self.stop.is_set():
                length = rng.choice((4096, 65536, 262144, MiB))
                offset = rng.randrange(0, self.size - length, 4096)
                data = bytes([rng.randrange(1, 256)]) * length
                with self.hold:
                    disk.write(offset, data)
                self.writes += 1
                self.bytes_written += length
                self.stop.wait(length / GUEST_RATE)  # pacing: a guest, not a benchmark


def make_disk(path: Path) -> None:
    """A disk whose every MiB holds a different pattern (and a few holes)."""
    with open(path, "wb") as f:
        for mib in range(DISK_SIZE // MiB):
            f.write(bytes([mib % 251 + 1]) * MiB if mib % 7 else bytes(MiB))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def start_daemon(work: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pyfleece", "daemon",
            "--drive", f"file={work / 'disk.raw'},format=raw,id=ide0-hd0,if=none",
            "--chardev", f"socket,path={work / 'qmp.sock'},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0",
            "--chardev", f"socket,path={work / 'hmp.sock'},server=on,wait=off,id=hmp0",
            "--monitor", "chardev=hmp0,mode=readline",
            "--nbd-server", f"addr.type=unix,addr.path={work / 'nbd.sock'}",
            "--export", "type=nbd,id=live,node-name=ide0-hd0,writable=on",
            "--pidfile", str(work / "daemon.pid")]  # fmt: skip
    log = open(work / "daemon.log", "wb")  # noqa: SIM115 (kept open for the child)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (work / "daemon.pid").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the daemon did not start:\n" + (work / "daemon.log").read_text())
        time.sleep(0.02)  # polling for the pidfile, with a deadline
    return proc


def qmp_ok(qmp: QmpConnection, command: str, **args: object) -> object:
    reply = qmp.execute(command, dict(args))
    if "error" in reply:
        raise RuntimeError(f"{command}: {reply['error']['desc']}")
    return reply["return"]


def pull(uri: str, dest: Path) -> float:
    """Copies the whole export to ``dest``, printing progress; returns the seconds taken."""
    start = time.monotonic()
    with NbdClient.connect(uri) as snap, open(dest, "wb") as out:
        buf = memoryview(bytearray(PULL_CHUNK))
        for offset in range(0, snap.size, PULL_CHUNK):
            n = min(PULL_CHUNK, snap.size - offset)
            snap.readinto(offset, buf[:n])
            out.write(buf[:n])
            done = offset + n
            if done % (16 * MiB) == 0 or done == snap.size:
                print(
                    f"\r  pulling the snapshot: {done * 100 / snap.size:5.1f}%", end="", flush=True
                )
    print()
    return time.monotonic() - start


def wait_event(qmp: QmpConnection, name: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for event in list(qmp.events):
            if event.get("event") == name:
                qmp.events.remove(event)
                return event
        qmp.events.append(qmp.receive())
    raise RuntimeError(f"no {name} event")


def run(work: Path) -> int:
    make_disk(work / "disk.raw")
    print(f"created a {DISK_SIZE // MiB} MiB disk; starting pyfleece daemon")
    daemon = start_daemon(work)
    nbd = work / "nbd.sock"
    try:
        with (
            QmpConnection(str(work / "qmp.sock"), timeout=30) as qmp,
            HmpConnection(str(work / "hmp.sock"), timeout=30) as hmp,
        ):
            qmp.negotiate()
            guest = Guest(f"nbd+unix:///ide0-hd0?socket={nbd}", DISK_SIZE)
            guest_thread = threading.Thread(target=guest.run, name="guest")
            guest_thread.start()
            try:
                return fleece(work, qmp, hmp, guest)
            finally:
                guest.stop.set()
                guest_thread.join()
    finally:
        daemon.terminate()
        daemon.wait(30)


def fleece(work: Path, qmp: QmpConnection, hmp: HmpConnection, guest: Guest) -> int:
    nbd = work / "nbd.sock"
    while guest.writes < 20 and not guest.stop.wait(0.01):  # let the guest get going
        pass
    subprocess.run([sys.executable, "-m", "pyfleece", "img", "create", "-q", "-f", "qcow2",
                    str(work / "BACKUP.qcow2"), str(DISK_SIZE)], check=True)  # fmt: skip
    print("snapshot (the seed's recipe):")
    with guest.hold:  # the snapshot instant: no guest write in flight
        at_snapshot = sha256_file(work / "disk.raw")
        print("  (hmp) " + hmp.command(
            "drive_add backing=ide0-hd0,file=BACKUP.qcow2,id=target0,if=none").strip())  # fmt: skip
        qmp_ok(qmp, "blockdev-backup", device="ide0-hd0", sync="none", target="target0")
        print("  (qmp) blockdev-backup device=ide0-hd0 sync=none target=target0")
    qmp_ok(qmp, "nbd-server-add", device="target0")
    print("  (qmp) nbd-server-add device=target0")
    writes_before = guest.bytes_written
    seconds = pull(f"nbd+unix:///target0?socket={nbd}", work / "pulled.raw")
    guest_during = guest.bytes_written - writes_before
    qmp_ok(qmp, "block-job-complete", device="ide0-hd0")
    completed = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    print("  (qmp) block-job-complete device=ide0-hd0")
    print("  (hmp) drive_del target0 " + (hmp.command("drive_del target0").strip() or "(ok)"))
    backup_size = (work / "BACKUP.qcow2").stat().st_blocks * 512
    os.unlink(work / "BACKUP.qcow2")
    print("  (shell) rm BACKUP.qcow2")
    pulled = sha256_file(work / "pulled.raw")
    data = completed.get("data", {})
    copied = int(data.get("offset", 0)) if isinstance(data, dict) else 0
    ok = pulled == at_snapshot
    print(f"""
report
  disk size:                {DISK_SIZE // MiB} MiB
  guest writes during pull: {guest_during / MiB:.1f} MiB
  clusters copied (64 KiB): {copied // 65536} ({copied / MiB:.1f} MiB kept for the snapshot)
  temporary image on disk:  {backup_size / MiB:.1f} MiB
  snapshot pull:            {DISK_SIZE / MiB / seconds:.0f} MiB/s ({seconds:.2f} s)
  disk at snapshot instant: sha256 {at_snapshot[:16]}...
  pulled snapshot:          sha256 {pulled[:16]}...
  result:                   {"IDENTICAL: the pull is the disk at the snapshot instant" if ok
                             else "MISMATCH"}""")  # fmt: skip
    return 0 if ok else 1


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pyfleece-demo-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
