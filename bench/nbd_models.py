"""Concurrency models for the NBD server's data path, measured side by side.

This is the experiment behind the choice recorded in docs/nbd.md: minimal servers (fixed
newstyle, GO, structured replies, READ/WRITE/FLUSH/DISC on one raw file) that differ only in
how requests are scheduled:

  inline     one thread per connection reads a request, serves it, replies, in order
  workers    one reader thread per connection hands every request to a worker pool;
             replies go out of order under a send lock
  hybrid     inline for reads and writes; FLUSH goes to a worker (out-of-order replies)
  asyncio    one event loop; a Protocol parses requests and serves them in the loop

and, for the inline model, how read payloads are sent:

  pread      preadv into a reused buffer, then one sendmsg of header + payload
  sendfile   sendmsg(header, MSG_MORE), os.sendfile, then the final NONE chunk

Usage: nbd_models.py MODEL[:READPATH] FILE SOCKET   (serves until killed)
       nbd_models.py --measure FILE                  (runs fio/nbdcopy against each model)
       nbd_models.py                                 (the same on a fresh 1 GiB file)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

REQ = struct.Struct(">IHHQQI")
CHUNK = struct.Struct(">IHHQI")
SIMPLE = struct.Struct(">IIQ")
OPTREP = struct.Struct(">QIII")
SENDFILE_MIN = 64 * 1024


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)


def handshake(sock: socket.socket, size: int) -> bool:
    sock.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    recv_exact(sock, 4)
    while True:
        _, opt, length = struct.unpack(">QII", recv_exact(sock, 16))
        recv_exact(sock, length)
        if opt == 8:
            sock.sendall(OPTREP.pack(0x3E889045565A9, opt, 1, 0))
        elif opt in (6, 7):
            info = struct.pack(">HQH", 0, size, 1 | 4 | 8 | 256)
            sock.sendall(OPTREP.pack(0x3E889045565A9, opt, 3, len(info)) + info)
            sock.sendall(OPTREP.pack(0x3E889045565A9, opt, 1, 0))
            if opt == 7:
                return True
        elif opt == 2:
            sock.sendall(OPTREP.pack(0x3E889045565A9, opt, 1, 0))
            return False
        else:
            sock.sendall(OPTREP.pack(0x3E889045565A9, opt, 0x80000001, 0))


class Conn:
    """Request parsing with a buffered header reader, shared by the threaded models."""

    def __init__(self, sock: socket.socket, fd: int, use_sendfile: bool) -> None:
        self.sock = sock
        self.fd = fd
        self.rbuf = bytearray(65536)
        self.rview = memoryview(self.rbuf)
        self.start = self.end = 0
        self.buf = bytearray(1 << 20)
        self.bview = memoryview(self.buf)
        self.lock = threading.Lock()
        self.use_sendfile = use_sendfile

    def next_header(self) -> tuple[int, int, int, int, int] | None:
        if self.end - self.start < 28:
            rest = self.end - self.start
            self.rview[:rest] = self.rview[self.start : self.end]
            self.start, self.end = 0, rest
            while self.end < 28:
                n = self.sock.recv_into(self.rview[self.end :])
                if n == 0:
                    return None
                self.end += n
        _magic, flags, kind, cookie, offset, length = REQ.unpack_from(self.rbuf, self.start)
        self.start += 28
        return flags, kind, cookie, offset, length

    def payload_into(self, view: memoryview) -> None:
        have = min(self.end - self.start, len(view))
        view[:have] = self.rview[self.start : self.start + have]
        self.start += have
        while have < len(view):
            n = self.sock.recv_into(view[have:])
            if n == 0:
                raise EOFError
            have += n

    def read_reply(self, cookie: int, offset: int, length: int, buf: memoryview) -> None:
        if self.use_sendfile and length >= SENDFILE_MIN:
            head = CHUNK.pack(0x668E33EF, 0, 1, cookie, length + 8) + struct.pack(">Q", offset)
            with self.lock:
                self.sock.sendmsg([head], [], socket.MSG_MORE)
                sent = 0
                while sent < length:
                    sent += os.sendfile(self.sock.fileno(), self.fd, offset + sent, length - sent)
                self.sock.sendall(CHUNK.pack(0x668E33EF, 1, 0, cookie, 0))
            return
        view = buf[:length]
        os.preadv(self.fd, [view], offset)
        head = CHUNK.pack(0x668E33EF, 1, 1, cookie, length + 8) + struct.pack(">Q", offset)
        with self.lock:
            self.sendmsg_all([head, view])

    def sendmsg_all(self, bufs: list[bytes | memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        sent = self.sock.sendmsg(bufs)
        if sent < total:
            joined = b"".join(bytes(b) for b in bufs)
            self.sock.sendall(joined[sent:])

    def simple(self, cookie: int, err: int = 0) -> None:
        with self.lock:
            self.sock.sendall(SIMPLE.pack(0x67446698, err, cookie))


def serve_inline(conn: Conn, flush_in_worker: concurrent.futures.Executor | None) -> None:
    while True:
        hdr = conn.next_header()
        if hdr is None:
            return
        _flags, kind, cookie, offset, length = hdr
        if kind == 0:
            conn.read_reply(cookie, offset, length, conn.bview)
        elif kind == 1:
            view = conn.bview[:length]
            conn.payload_into(view)
            os.pwritev(conn.fd, [view], offset)
            conn.simple(cookie)
        elif kind == 3:
            if flush_in_worker is not None:
                flush_in_worker.submit(_flush, conn, cookie)
            else:
                _flush(conn, cookie)
        elif kind == 2:
            return
        else:
            conn.simple(cookie, 22)


def _flush(conn: Conn, cookie: int) -> None:
    os.fdatasync(conn.fd)
    conn.simple(cookie)


def serve_workers(conn: Conn, pool: concurrent.futures.Executor) -> None:
    pending: set[concurrent.futures.Future[None]] = set()
    while True:
        hdr = conn.next_header()
        if hdr is None or hdr[1] == 2:
            break
        _flags, kind, cookie, offset, length = hdr
        if kind == 1:
            data = bytearray(length)
            conn.payload_into(memoryview(data))
            pending.add(pool.submit(_write, conn, cookie, offset, data))
        elif kind == 0:
            pending.add(pool.submit(_read, conn, cookie, offset, length))
        elif kind == 3:
            pending.add(pool.submit(_flush, conn, cookie))
        if len(pending) > 64:
            pending = {f for f in pending if not f.done()}
    concurrent.futures.wait(pending)


_local = threading.local()


def _read(conn: Conn, cookie: int, offset: int, length: int) -> None:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(1 << 20))
    conn.read_reply(cookie, offset, length, buf)


def _write(conn: Conn, cookie: int, offset: int, data: bytearray) -> None:
    os.pwritev(conn.fd, [data], offset)
    conn.simple(cookie)


def run_threaded(model: str, fd: int, size: int, path: str, use_sendfile: bool) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    pool = concurrent.futures.ThreadPoolExecutor(8)

    def client(sock: socket.socket) -> None:
        with sock:
            try:
                if not handshake(sock, size):
                    return
                conn = Conn(sock, fd, use_sendfile)
                if model == "inline":
                    serve_inline(conn, None)
                elif model == "hybrid":
                    serve_inline(conn, pool)
                else:
                    serve_workers(conn, pool)
            except (EOFError, OSError):
                pass

    while True:
        sock, _ = listener.accept()
        threading.Thread(target=client, args=(sock,), daemon=True).start()


class AsyncConn(asyncio.Protocol):
    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buf = bytearray()
        self.state = "greeting"
        self.want = 4
        self.write_hdr: tuple[int, int, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        self.t.write(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        buf = self.buf
        while True:
            if self.state == "greeting":
                if len(buf) - pos < 4:
                    break
                pos += 4
                self.state = "opt"
            elif self.state == "opt":
                if len(buf) - pos < 16:
                    break
                _, opt, length = struct.unpack_from(">QII", buf, pos)
                if len(buf) - pos < 16 + length:
                    break
                pos += 16 + length
                self.option(opt)
            elif self.write_hdr is not None:
                cookie, offset, length = self.write_hdr
                if len(buf) - pos < length:
                    break
                os.pwritev(self.fd, [memoryview(buf)[pos : pos + length]], offset)
                pos += length
                self.write_hdr = None
                self.t.write(SIMPLE.pack(0x67446698, 0, cookie))
            else:
                if len(buf) - pos < 28:
                    break
                _, _flags, kind, cookie, offset, length = REQ.unpack_from(buf, pos)
                pos += 28
                if kind == 0:
                    data_buf = bytearray(length)
                    os.preadv(self.fd, [data_buf], offset)
                    head = CHUNK.pack(0x668E33EF, 1, 1, cookie, length + 8)
                    self.t.writelines([head, struct.pack(">Q", offset), data_buf])
                elif kind == 1:
                    self.write_hdr = (cookie, offset, length)
                elif kind == 3:
                    os.fdatasync(self.fd)
                    self.t.write(SIMPLE.pack(0x67446698, 0, cookie))
                elif kind == 2:
                    self.t.close()
                    break
        del self.buf[:pos]

    def option(self, opt: int) -> None:
        if opt == 8:
            self.t.write(OPTREP.pack(0x3E889045565A9, opt, 1, 0))
        elif opt in (6, 7):
            info = struct.pack(">HQH", 0, self.size, 1 | 4 | 8 | 256)
            self.t.write(OPTREP.pack(0x3E889045565A9, opt, 3, len(info)) + info)
            self.t.write(OPTREP.pack(0x3E889045565A9, opt, 1, 0))
            if opt == 7:
                self.state = "transmit"
        else:
            self.t.write(OPTREP.pack(0x3E889045565A9, opt, 0x80000001, 0))


def run_asyncio(fd: int, size: int, path: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: AsyncConn(fd, size), path)
        await server.serve_forever()

    asyncio.run(main())


def serve(spec: str, filename: str, path: str) -> None:
    model, _, readpath = spec.partition(":")
    fd = os.open(filename, os.O_RDWR)
    size = os.fstat(fd).st_size
    if model == "asyncio":
        run_asyncio(fd, size, path)
    else:
        run_threaded(model, fd, size, path, readpath == "sendfile")


# -- the measuring driver ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(uri: str, rw: str, bs: str, depth: int, runtime: int = 5) -> tuple[float, float]:
    """(IOPS or MiB/s, number of requests)."""
    cmd = ["fio", "--name=m", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", "--time_based", f"--runtime={runtime}",
           "--output-format=json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    rate = side["iops"] if bs == "4k" else side["bw_bytes"] / (1 << 20)
    return float(rate), float(side["total_ios"])


def nbdcopy(uri: str) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return (1 << 30) / (time.perf_counter() - start) / (1 << 30)


def measure(filename: str) -> None:
    """Each model: best of runs, and its CPU microseconds per request (load-independent)."""
    specs = ["inline:pread", "inline:sendfile", "hybrid:pread", "workers:pread", "asyncio"]
    tmp = tempfile.mkdtemp()
    try:
        for spec in specs:
            path = os.path.join(tmp, spec.replace(":", "-") + ".sock")
            proc = subprocess.Popen([sys.executable, __file__, spec, filename, path])
            try:
                while not os.path.exists(path):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{spec} died")
                    time.sleep(0.05)
                uri = f"nbd+unix:///?socket={path}"
                start = cpu_seconds(proc.pid)
                runs = [fio(uri, "randread", "4k", 32) for _ in range(2)]
                rr_cpu = (cpu_seconds(proc.pid) - start) * 1e6 / sum(n for _, n in runs)
                rr = max(r for r, _ in runs)
                cp = max(nbdcopy(uri) for _ in range(3))
                wr = max(fio(uri, "write", "1m", 8)[0] for _ in range(2))
                load = os.getloadavg()[0]
                print(
                    f"{spec:16} randread4k {rr:9.0f} IOPS ({rr_cpu:5.2f} us CPU each)  "
                    f"nbdcopy {cp:5.2f} GiB/s  write1M {wr:7.0f} MiB/s  (load {load:.2f})",
                    flush=True,
                )
            finally:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(tmp)


def measure_fresh() -> None:
    """Measures every model on a fresh 1 GiB file of random bytes (``make bench``)."""
    tmp = tempfile.mkdtemp()
    try:
        image = os.path.join(tmp, "disk.raw")
        with open(image, "wb") as f, open("/dev/urandom", "rb") as rnd:
            for _ in range(128):
                f.write(rnd.read(8 << 20))
        measure(image)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        measure_fresh()
    elif sys.argv[1] == "--measure":
        measure(sys.argv[2])
    else:
        serve(sys.argv[1], sys.argv[2], sys.argv[3])
