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

from pyfleece.errors import PyfleeceError
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
            raise DemoFailed("the daemon did not start:\n" + (work / "daemon.log").read_text())
        time.sleep(0.02)  # polling for the pidfile, with a deadline
    return proc


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and why."""


def step(channel: str, text: str, answer: str = "") -> None:
    """Prints one step of the recipe: where it was sent, what, and what came back."""
    print(f"  {'(' + channel + ')':<8}{text}{'  -> ' + answer if answer else ''}")


def qmp_step(qmp: QmpConnection, command: str, **args: object) -> object:
    """Runs a QMP command, printed as the README writes it (qmp-shell's syntax)."""
    reply = qmp.execute(command, dict(args))
    if "error" in reply:
        raise DemoFailed(f"{command}: {reply['error']['desc']}")
    step("qmp", " ".join([command, *(f"{k}={v}" for k, v in args.items())]))
    return reply["return"]


def hmp_ok(hmp: HmpConnection, line: str) -> None:
    """Runs an HMP command; ``drive_add`` answers OK and ``drive_del`` nothing on success."""
    answer = hmp.command(line).strip()
    if answer not in ("", "OK"):
        raise DemoFailed(f"{line}: {answer}")
    step("hmp", line, answer)


def pull(uri: str, dest: Path, label: str) -> float:
    """Copies the whole export to ``dest``, showing progress after ``label`` (rewritten in
    place on a terminal, printed once at the end otherwise); returns the seconds taken."""
    start = time.monotonic()
    live = sys.stdout.isatty()
    with NbdClient.connect(uri) as snap, open(dest, "wb") as out:
        buf = memoryview(bytearray(PULL_CHUNK))
        for offset in range(0, snap.size, PULL_CHUNK):
            n = min(PULL_CHUNK, snap.size - offset)
            snap.readinto(offset, buf[:n])
            out.write(buf[:n])
            done = offset + n
            if live and (done % (16 * MiB) == 0 or done == snap.size):
                print(f"\r{label} {done * 100 / snap.size:5.1f}%", end="", flush=True)
    print("" if live else f"{label} 100.0%")
    return time.monotonic() - start


def wait_event(qmp: QmpConnection, name: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for event in list(qmp.events):
            if event.get("event") == name:
                qmp.events.remove(event)
                return event
        qmp.events.append(qmp.receive())
    raise DemoFailed(f"no {name} event within 30 s")


def run(work: Path) -> int:
    make_disk(work / "disk.raw")
    print(f"pyfleece demo: image fleecing, in {work} (removed at the end)")
    print(f"  disk.raw: a {DISK_SIZE // MiB} MiB disk, served by pyfleece daemon as drive ide0-hd0")
    print("  (QMP on qmp.sock, HMP on hmp.sock, NBD on nbd.sock)")
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
    print(f"  a simulated guest writes the disk over NBD, up to {GUEST_RATE // MiB} MiB/s")
    while guest.writes < 20 and not guest.stop.wait(0.01):  # let the guest get going
        pass
    print("\nthe seed's recipe (README.md), while the guest keeps writing:")
    create = ["img", "create", "-q", "-f", "qcow2", "BACKUP.qcow2", str(DISK_SIZE)]
    subprocess.run([sys.executable, "-m", "pyfleece", *create], check=True, cwd=work)
    step("shell", "pyfleece " + " ".join(create))
    with guest.hold:  # the snapshot instant: no guest write in flight
        at_snapshot = sha256_file(work / "disk.raw")
        hmp_ok(hmp, "drive_add backing=ide0-hd0,file=BACKUP.qcow2,id=target0,if=none")
        qmp_step(qmp, "blockdev-backup", device="ide0-hd0", sync="none", target="target0")
    qmp_step(qmp, "nbd-server-add", device="target0")
    writes_before = guest.bytes_written
    uri = "nbd+unix:///target0?socket=nbd.sock"
    seconds = pull(f"nbd+unix:///target0?socket={nbd}", work / "pulled.raw",
                   f"  {'(nbd)':<8}pull {uri} -> pulled.raw:")  # fmt: skip
    guest_during = guest.bytes_written - writes_before
    qmp_step(qmp, "block-job-complete", device="ide0-hd0")
    completed = wait_event(qmp, "BLOCK_JOB_COMPLETED")
    hmp_ok(hmp, "drive_del target0")
    backup_size = (work / "BACKUP.qcow2").stat().st_blocks * 512
    os.unlink(work / "BACKUP.qcow2")
    step("shell", "rm BACKUP.qcow2")
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
    """Runs the demo; 0 when the pull equals the disk at the snapshot instant. Failures
    print one line (no traceback) and return 1; Ctrl-C returns 130."""
    try:
        with tempfile.TemporaryDirectory(prefix="pyfleece-demo-") as tmp:
            return run(Path(tmp))
    except KeyboardInterrupt:
        print("\npyfleece demo: interrupted", file=sys.stderr)
        return 130
    except (DemoFailed, OSError, subprocess.SubprocessError, PyfleeceError) as err:
        print(f"\npyfleece demo: failed: {_describe(err)}", file=sys.stderr)
        return 1


def _describe(err: BaseException) -> str:
    """An error as a user reads it: an OS error names its file, without "[Errno N]"."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
