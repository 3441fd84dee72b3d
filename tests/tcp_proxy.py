"""A TCP proxy for fault tests: the service talks to a dependency through it, and the
test takes the dependency away (refuse and cut connections) and brings it back."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from gridwarden.embedded import free_port
from ingest.mqtt_wire import first_packet_size

# Makes, per connection, a filter of what the client sends (bytes in → bytes forwarded).
FilterFactory = Callable[[], Callable[[bytes], bytes]]


class TcpProxy:
    """127.0.0.1:port → 127.0.0.1:target_port, which the test can cut and restore.

    `upstream_filter` (optional) rewrites what clients send, e.g. to swallow MQTT PUBACKs;
    `downstream_delay_s` holds back what the dependency sends (a slow link, or a busy peer)."""

    def __init__(
        self,
        target_port: int,
        upstream_filter: FilterFactory | None = None,
        downstream_delay_s: float = 0.0,
    ) -> None:
        self.target_port = target_port
        self.upstream_filter = upstream_filter
        self.downstream_delay_s = downstream_delay_s
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._blackholed: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def database_url(self, original: str) -> str:
        """`original` (postgresql://user@127.0.0.1:port/db) through the proxy."""
        head, _, tail = original.rpartition(f":{self.target_port}/")
        return f"{head}:{self.port}/{tail}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.cut()

    async def cut(self) -> None:
        """Cut the open connections (both ends see the close); new ones are accepted
        again while the proxy is started."""
        closing = list(self._writers)
        for writer in closing:
            writer.close()
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        # Only what was closed: a connection accepted during the wait above is live.
        self._writers.difference_update(closing)

    def blackhole(self) -> None:
        """From now on the open connections silently lose everything sent on them, in both
        directions, and are never closed (a peer gone without a FIN or RST: a rebooted
        host, a NAT table flushed); new connections work."""
        self._blackholed |= self._pipes

    def connections(self) -> int:
        """Open connections (two pipes each)."""
        return len(self._pipes) // 2

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)  # a cut or stop while the upstream connects closes it too
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        if writer.is_closing():  # cut meanwhile: no pipes for it, nothing left open
            up_writer.close()
            return
        self._writers.add(up_writer)
        upstream = self.upstream_filter() if self.upstream_filter else None
        pipes = ((reader, up_writer, upstream, 0.0),
                 (up_reader, writer, None, self.downstream_delay_s))  # fmt: skip
        for source, sink, rewrite, delay_s in pipes:
            task = asyncio.create_task(self._pipe(source, sink, rewrite, delay_s))
            self._pipes.add(task)
            # Closed when the pipe ends, also when it is cancelled before it ever ran (its
            # `finally` would not run then, and the transport would be left open).
            task.add_done_callback(functools.partial(self._pipe_done, sink))

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        rewrite: Callable[[bytes], bytes] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        me = asyncio.current_task()
        try:
            while data := await source.read(65536):
                if me in self._blackholed:
                    continue
                if delay_s:
                    await asyncio.sleep(delay_s)
                sink.write(rewrite(data) if rewrite else data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass

    def _pipe_done(self, sink: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        self._pipes.discard(task)
        if task not in self._blackholed:
            sink.close()
            self._writers.discard(sink)


def drop_mqtt_packets(packet_type: int) -> Callable[[bytes], bytes]:
    """A filter forwarding an MQTT byte stream without the packets of `packet_type` (e.g.
    4, PUBACK: the broker never learns that a message was processed)."""
    buffer = bytearray()

    def rewrite(data: bytes) -> bytes:
        buffer.extend(data)
        out = bytearray()
        while (size := first_packet_size(buffer)) is not None and size <= len(buffer):
            if buffer[0] >> 4 != packet_type:
                out += buffer[:size]
            del buffer[:size]
        return bytes(out)

    return rewrite
