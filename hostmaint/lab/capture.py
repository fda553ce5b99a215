"""What crosses a lab link: a packet capture on a root-side veth (an ``AF_PACKET`` socket, no tcpdump).

``with WireCapture(link, b"marker") as cap: ...`` counts, while the block runs, the TCP payload bytes
the link carries, how often the marker occurs in them (also across two segments of one flow), the
segments that start with a TLS record header (content type 20-23, version 3.x) or hold QEMU's
migration stream magic ``QEVM``, and what the kernel dropped. Nothing is stored but the counts and the
last bytes of each flow. Root only; the link must be one the lab made.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
QEMU_STREAM_MAGIC = b"QEVM"


@dataclass
class WireCounts:
    """What a capture saw."""

    packets: int = 0
    payload_bytes: int = 0
    marker_hits: int = 0
    tls_records: int = 0  # TCP segments whose payload starts with a TLS record header
    qemu_stream_headers: int = 0
    dropped: int = 0  # packets the kernel could not hand to the capture
    tails: dict[tuple[bytes, int, bytes, int], bytes] = field(default_factory=dict, repr=False)


class WireCapture:
    """Count TCP payloads crossing ``link`` (a root-namespace interface) while the ``with`` block runs."""

    def __init__(self, link: str, marker: bytes) -> None:
        if not marker:
            raise ValueError("a capture needs a marker to look for")
        self.link = link
        self.marker = marker
        self.counts = WireCounts()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        # a migration sends hundreds of MiB/s: a big buffer, or the kernel drops what Python reads too slowly
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 * 2**20)
        self._sock.bind((link, 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name=f"capture-{link}", daemon=True)

    def __enter__(self) -> WireCapture:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(30)
        stats = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        self.counts.dropped += struct.unpack("II", stats)[1]
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self._count(frame)
        # what is still queued belongs to the block's traffic too
        self._sock.setblocking(False)
        while True:
            try:
                self._count(self._sock.recv(1 << 18))
            except (BlockingIOError, OSError):
                return

    def _count(self, frame: bytes) -> None:
        c = self.counts
        c.packets += 1
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            return  # not IPv4
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6 or len(ip) < ihl + 20:
            return  # not TCP
        tcp = ip[ihl:total] if total >= ihl + 20 else ip[ihl:]
        offset = (tcp[12] >> 4) * 4
        payload = tcp[offset:]
        if not payload:
            return
        c.payload_bytes += len(payload)
        if payload[0] in (20, 21, 22, 23) and payload[1:2] == b"\x03":
            c.tls_records += 1
        if QEMU_STREAM_MAGIC in payload:
            c.qemu_stream_headers += 1
        flow = (ip[12:16], struct.unpack("!H", tcp[0:2])[0], ip[16:20], struct.unpack("!H", tcp[2:4])[0])
        data = c.tails.get(flow, b"") + payload
        c.marker_hits += data.count(self.marker)
        c.tails[flow] = data[-(len(self.marker) - 1):] if len(self.marker) > 1 else b""
