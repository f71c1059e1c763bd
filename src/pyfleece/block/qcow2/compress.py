"""Decompressing qcow2 compressed clusters (qemu-docs-interop-qcow2.rst, "compression_type").

Type 0 is raw deflate (no zlib header), type 1 is zstd. A compressed cluster's data may be
followed by unrelated bytes (the next cluster's data shares the last sector), so
decompression stops once it has produced exactly one cluster; producing less is an error.
Output is bounded by the cluster size whatever the input claims.
"""

from __future__ import annotations

import io
import zlib

from pyfleece.block.qcow2.format import CompressionType
from pyfleece.errors import CorruptImage


def decompress_cluster(data: bytes, cluster_size: int, compression: int) -> bytes:
    """Decompresses one cluster.

    Raises:
        CorruptImage: the data does not decompress to a full cluster.
    """
    if compression == CompressionType.ZSTD:
        out = _zstd(data, cluster_size)
    else:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as err:
            raise CorruptImage(f"qcow2: compressed cluster is not valid deflate: {err}") from err
    if len(out) != cluster_size:
        raise CorruptImage(
            f"qcow2: compressed cluster decompresses to {len(out)} bytes, not {cluster_size}"
        )
    return out


def _zstd(data: bytes, cluster_size: int) -> bytes:
    import zstandard  # imported on first use: most images are not zstd-compressed

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
    chunks = []
    want = cluster_size
    try:
        while want:
            chunk = reader.read(want)
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
    except zstandard.ZstdError as err:
        raise CorruptImage(f"qcow2: compressed cluster is not valid zstd data: {err}") from err
    return b"".join(chunks)
