"""Emulated network links in user space: a TCP proxy with delay, bandwidth, loss and resets.

The kernel's ``tc netem`` is the usual tool, but it needs the ``sch_netem`` module, which a
container often lacks (this project's build machines have network namespaces but no netem).
:class:`EmulatedLink` gives the same effects to any TCP protocol (gRPC, HTTP/2, TLS pass through
untouched) between a client and a server on this host:

* **delay** — every chunk is delivered ``rtt_ms / 2`` (± ``jitter_ms``) after it was read, in
  order, without holding back the chunks behind it (a pipe, not a stop-and-wait link);
* **bandwidth** — chunks are serialized at ``bandwidth_mbps``: the link is busy for
  ``bytes * 8 / bandwidth`` per chunk, so large messages take their real transfer time;
* **loss** — TCP never loses bytes, it retransmits: each ~1448-byte segment is lost with
  probability ``loss`` and a chunk with a lost segment is delayed by one retransmission
  timeout (``rto_ms``, Linux's minimum is 200 ms), as the receiver would see it;
* **resets** — with ``reset_rate_hz`` > 0, connections are cut at random times (RST, as a
  Wi-Fi roam or a NAT timeout does); the client sees UNAVAILABLE and must reconnect and retry.

Directions are symmetric (``up`` and ``down`` have the same figures). Statistics (``stats``)
count connections, resets, bytes and retransmission stalls; ``schedule`` keeps every chunk's
read and release times (:class:`Release`), so a test asserts the delays the link computed rather
than timing the machine. ``clock`` and ``sleep`` are injectable for the same reason.

It lives beside the tests: the library never emulates links.
"""

from __future__ import annotations

import collections
import math
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EmulatedLink", "LinkStats", "Release", "WIFI", "LTE", "LOSSY_3G"]

_MSS = 1448  # bytes of payload per TCP segment on Ethernet MTU 1500


@dataclass
class LinkStats:
    connections: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    stalls: int = 0  # chunks delayed by a retransmission timeout


@dataclass(frozen=True)
class Release:
    """When one chunk was read and when the link releases it (seconds on the link's clock)."""

    up: bool  # client -> server
    nbytes: int
    read_at: float
    release_at: float
    serialize_s: float  # time on the wire at the link's bandwidth
    lost: bool  # charged one retransmission timeout

    @property
    def delay_s(self) -> float:
        return self.release_at - self.read_at


@dataclass
class _Pipe:
    """One direction of one connection: chunks with their release times, and a sender thread."""

    dst: socket.socket | None
    up: bool = True
    queue: collections.deque = field(default_factory=collections.deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    link_free: float = 0.0  # when the emulated wire finishes serializing the last chunk
    last_release: float = 0.0
    closed: bool = False


class EmulatedLink:
    """A TCP proxy from ``listen`` to ``target`` that behaves like a slow, lossy link.

    Parameters
    ----------
    target : str
        ``host:port`` of the real server.
    rtt_ms, jitter_ms : float
        Round-trip time and its uniform jitter (each direction gets half).
    bandwidth_mbps : float or None
        Link rate in Mbit/s each way; None for unlimited.
    loss : float
        Probability that a TCP segment is lost (it costs one ``rto_ms``).
    rto_ms : float
        Retransmission timeout charged per chunk with a lost segment.
    reset_rate_hz : float
        Mean rate of random connection resets (Poisson); 0 for none.
    blackhole : bool
        Accept connections but deliver nothing (a dead link): clients see their deadline expire.
    seed : int
        Seed of the jitter, loss and reset draws.
    listen : str
        Address to listen on (port 0: the OS picks; see :attr:`address`).
    clock, sleep : callable
        The time source (seconds) release times are computed on and the wait until a release;
        ``time.monotonic`` and ``time.sleep`` unless a test injects its own.
    """

    def __init__(
        self,
        target: str,
        *,
        rtt_ms: float = 0.0,
        jitter_ms: float = 0.0,
        bandwidth_mbps: float | None = None,
        loss: float = 0.0,
        rto_ms: float = 200.0,
        reset_rate_hz: float = 0.0,
        blackhole: bool = False,
        seed: int = 0,
        listen: str = "127.0.0.1:0",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rtt_ms < 0 or jitter_ms < 0 or rto_ms < 0 or reset_rate_hz < 0:
            raise ValueError("rtt_ms, jitter_ms, rto_ms and reset_rate_hz must be >= 0")
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        if bandwidth_mbps is not None and bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth_mbps must be > 0, got {bandwidth_mbps}")
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.rtt_ms, self.jitter_ms, self.bandwidth_mbps = rtt_ms, jitter_ms, bandwidth_mbps
        self.loss, self.rto_ms, self.reset_rate_hz, self.blackhole = loss, rto_ms, reset_rate_hz, blackhole
        self.stats = LinkStats()
        self.schedule: list[Release] = []
        self._clock, self._sleep = clock, sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        lhost, lport = listen.rsplit(":", 1)
        self._listener = socket.create_server((lhost, int(lport)))
        self._listener.settimeout(0.2)
        self.address = f"{lhost}:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="link-accept")]
        if reset_rate_hz > 0:
            self._threads.append(threading.Thread(target=self._resetter, daemon=True, name="link-reset"))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EmulatedLink:
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for a, b in conns:
            _close(a)
            _close(b)

    def __enter__(self) -> EmulatedLink:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the proxy
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client, reset=True)
                continue
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append((client, server))
                self.stats.connections += 1
            for src, dst, up in ((client, server, True), (server, client, False)):
                pipe = _Pipe(dst, up=up)
                threading.Thread(target=self._read, args=(src, pipe, up), daemon=True).start()
                threading.Thread(target=self._send, args=(pipe, (client, server)), daemon=True).start()

    def _release(self, pipe: _Pipe, n: int, now: float) -> Release:
        """Schedule a chunk of ``n`` bytes read at ``now``: serialization, half the RTT, jitter, a loss stall."""
        with self._lock:
            jitter = self._rng.uniform(-1.0, 1.0) * self.jitter_ms / 2.0
            segments = max(1, math.ceil(n / _MSS))
            lost = self.loss > 0 and self._rng.random() > (1.0 - self.loss) ** segments
            if lost:
                self.stats.stalls += 1
        serial = 0.0 if self.bandwidth_mbps is None else n * 8.0 / (self.bandwidth_mbps * 1e6)
        pipe.link_free = max(pipe.link_free, now) + serial
        t = pipe.link_free + max(0.0, self.rtt_ms / 2.0 + jitter) / 1000.0 + (self.rto_ms / 1000.0 if lost else 0.0)
        pipe.last_release = max(pipe.last_release, t)  # in order: a stalled chunk holds back the rest
        rel = Release(pipe.up, n, now, pipe.last_release, serial, lost)
        with self._lock:
            self.schedule.append(rel)
        return rel

    def plan(self, sizes: list[int], *, up: bool = True, at: float = 0.0) -> list[Release]:
        """The schedule of chunks of ``sizes`` bytes all read at time ``at`` on a fresh pipe (no sockets)."""
        pipe = _Pipe(None, up=up)
        return [self._release(pipe, n, at) for n in sizes]

    def _read(self, src: socket.socket, pipe: _Pipe, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if up:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
                if self.blackhole:
                    continue
                release = self._release(pipe, len(data), self._clock()).release_at
                with pipe.cond:
                    pipe.queue.append((release, data))
                    pipe.cond.notify()
        except OSError:
            pass
        with pipe.cond:
            pipe.closed = True
            pipe.cond.notify()

    def _send(self, pipe: _Pipe, conn: tuple[socket.socket, socket.socket]) -> None:
        try:
            while True:
                with pipe.cond:
                    while not pipe.queue and not pipe.closed:
                        pipe.cond.wait()
                    if not pipe.queue:
                        break
                    release, data = pipe.queue.popleft()
                wait = release - self._clock()
                if wait > 0:
                    self._sleep(wait)
                assert pipe.dst is not None  # only plan() makes pipes without a socket
                pipe.dst.sendall(data)
        except OSError:
            pass
        for s in conn:  # one side is gone: so is the connection
            _close(s)
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)

    def _resetter(self) -> None:
        while not self._stop.wait(self._rng.expovariate(self.reset_rate_hz)):
            with self._lock:
                if not self._conns:
                    continue
                conn = self._conns.pop(self._rng.randrange(len(self._conns)))
                self.stats.resets += 1
            for s in conn:
                _close(s, reset=True)


def _close(s: socket.socket, reset: bool = False) -> None:
    try:
        if reset:  # RST instead of FIN, as a link that drops the connection: linger 0, then close
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RD)  # wakes the reader thread, sends nothing
        else:
            s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# Typical figures (see experiments.inference.profiles.NETWORKS for sources): keyword arguments of EmulatedLink.
WIFI: dict[str, Any] = {"rtt_ms": 5.0, "jitter_ms": 2.0, "bandwidth_mbps": 80.0, "loss": 0.002}
LTE: dict[str, Any] = {"rtt_ms": 50.0, "jitter_ms": 10.0, "bandwidth_mbps": 8.0, "loss": 0.005}
LOSSY_3G: dict[str, Any] = {"rtt_ms": 150.0, "jitter_ms": 30.0, "bandwidth_mbps": 1.0, "loss": 0.01}
