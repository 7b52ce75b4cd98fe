"""Shrink a float32 weights file losslessly for carrying to a device machine, and restore it there.

    python benchmarks/carry_weights.py pack weights/inception-fid-nofc.pth .carry-weights.packed
    python3 benchmarks/carry_weights.py unpack .carry-weights.packed weights/inception-fid-nofc.pth

A device call carries at most 64 MiB with the working tree. The offline Inception weights are 87.5
MB, and general-purpose compressors barely touch float32 numbers (xz: 79.6 MB). Split into byte
planes — byte ``i`` of every 4-byte word, ``plane_i = data[i::4]`` — the plane of each float's
sign and high exponent bits holds few distinct values and compresses to about a third, while the
mantissa planes are stored as they are: 73.1 MB in all, which lets the weights, the data and the
wheels travel in two calls instead of three. ``unpack`` gives back the exact bytes (the caller
checks the whole file's sha256).

The packed file: the magic ``DDPMPLN1``, the original length and, for each of the four planes, its
stored length and whether it is LZMA-compressed (little-endian ``<QQ?``), then the planes; the
``length % 4`` trailing bytes of the original follow raw.
"""

from __future__ import annotations

import argparse
import lzma
import struct
from pathlib import Path

import numpy as np

MAGIC = b"DDPMPLN1"
PLANE_HEADER = struct.Struct("<Q?")
#: a plane is compressed only if a 1 MiB sample of it shrinks below this fraction (mantissa planes do not)
WORTH_COMPRESSING = 0.9


def pack(data: bytes) -> bytes:
    """``data`` as four byte planes (``data[i::4]``), each LZMA-compressed where that pays."""
    words = len(data) // 4
    planes = np.frombuffer(data[: 4 * words], dtype=np.uint8).reshape(words, 4)
    parts = [MAGIC, struct.pack("<Q", len(data))]
    body = []
    for index in range(4):
        plane = planes[:, index].tobytes()
        sample = plane[: 1 << 20]
        compress = bool(sample) and len(lzma.compress(sample, preset=6)) < WORTH_COMPRESSING * len(sample)
        stored = lzma.compress(plane, preset=6) if compress else plane
        parts.append(PLANE_HEADER.pack(len(stored), compress))
        body.append(stored)
    return b"".join(parts + body) + data[4 * words :]


def unpack(packed: bytes) -> bytes:
    """The bytes :func:`pack` was given."""
    if not packed.startswith(MAGIC):
        raise ValueError("not a file written by carry_weights.py pack (its first bytes are not DDPMPLN1)")
    (length,) = struct.unpack_from("<Q", packed, len(MAGIC))
    offset = len(MAGIC) + 8
    headers = [PLANE_HEADER.unpack_from(packed, offset + i * PLANE_HEADER.size) for i in range(4)]
    offset += 4 * PLANE_HEADER.size
    words = length // 4
    planes = np.empty((words, 4), dtype=np.uint8)
    for index, (size, compressed) in enumerate(headers):
        stored = packed[offset : offset + size]
        offset += size
        try:
            plane = lzma.decompress(stored) if compressed else stored
        except lzma.LZMAError as error:
            raise ValueError(f"plane {index} does not decompress ({error}): the packed file is damaged or cut short") from error
        if len(plane) != words:
            raise ValueError(f"plane {index} holds {len(plane)} bytes, not {words}: the packed file is damaged or cut short")
        planes[:, index] = np.frombuffer(plane, dtype=np.uint8)
    tail = packed[offset:]
    if len(tail) != length - 4 * words:
        raise ValueError("the packed file is damaged or cut short (its trailing bytes do not match its length)")
    return planes.tobytes() + tail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("pack", "unpack"))
    parser.add_argument("source", type=Path)
    parser.add_argument("destination", type=Path)
    args = parser.parse_args(argv)
    convert = pack if args.command == "pack" else unpack
    # not ddpm_pipeline.atomic.atomic_path: importing the package (torch, diffusers) takes longer
    # than the packing itself, and this script needs only the standard library and NumPy
    partial = args.destination.with_name(args.destination.name + ".partial")
    partial.write_bytes(convert(args.source.read_bytes()))
    partial.replace(args.destination)
    print(f"{args.command}ed {args.source} ({args.source.stat().st_size} bytes) into {args.destination} "
          f"({args.destination.stat().st_size} bytes)")  # fmt: skip


if __name__ == "__main__":
    main()
