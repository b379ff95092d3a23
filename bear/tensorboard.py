"""TensorBoard scalars without the tensorboard package: an event file written by hand.

An event file (``events.out.tfevents.*``) is a sequence of TFRecords, each holding one serialised
``tensorflow.Event`` protocol buffer. A record is (little-endian)::

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

with masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8 (mod 2^32), crc = CRC-32C. The
first event carries ``file_version = "brain.Event:2"``; each later one a wall time, a step and a
``Summary`` of scalar values. Only the protobuf fields used here are encoded:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }

``tensorboard --logdir runs/`` reads the files as it reads those of ``SummaryWriter``.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

__all__ = ["ScalarEventWriter"]

CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected (CRC-32C, as TFRecord uses)
CRC_MASK_DELTA = 0xA282EAD8  # TFRecord's mask constant


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + CRC_MASK_DELTA) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 in two's complement, as protobuf encodes negatives
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(
    wall_time: float,
    step: int | None = None,
    file_version: str | None = None,
    summary: bytes | None = None,
) -> bytes:
    out = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time)  # field 1, wire type 1 (64-bit)
    if step is not None:
        out += _varint(2 << 3 | 0) + _varint(step)  # field 2, wire type 0 (varint)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if summary is not None:
        out += _field(5, summary)
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc32c(length))
        + data
        + struct.pack("<I", _masked_crc32c(data))
    )


class ScalarEventWriter:
    """Appends scalars to a new TensorBoard event file in ``folder``.

    Args:
        folder: an existing folder (the run folder); the file is
            ``events.out.tfevents.<unix time>.<host>.bear``, so a resumed run adds a second file
            and TensorBoard shows both as one run.
    """

    def __init__(self, folder: Path):
        now = time.time()
        self.path = Path(folder) / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.bear"
        self._append(_event(now, file_version="brain.Event:2"))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One event at ``step`` holding each ``tag -> value`` as a float32 scalar."""
        values = b"".join(
            _field(1, _field(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        self._append(_event(time.time(), step=step, summary=values))

    def _append(self, event: bytes) -> None:
        with self.path.open("ab") as fh:
            fh.write(_record(event))
