"""Saving the embedded Mosquitto's persistence file as often as that is cheap.

Mosquitto 2.0 writes its whole in-memory database at every save (a new file, fsync,
rename) and serves no client meanwhile. While the service keeps up, the file is a few
kilobytes and a save takes milliseconds; with a backlog queued (the service down for a
while, or a load above its rate) it grows to 100-200 MB and a save takes about a second.
With Mosquitto's own `autosave_interval 1` the saves then ran back to back: in the
benchmark's saturated phase an alarm event waited 1.0-1.2 s (p99) in the broker before the
service could read it, 65-120 ms with saves 30 s apart (two runs each, 2026-12-03).

So the broker's own timer is only a backstop (`MOSQUITTO_AUTOSAVE_BACKSTOP_S`, for while no
pacer runs), and `AutosavePacer` asks for each save itself (SIGUSR1), times it by watching
the file being written and replaced, and waits before the next in proportion (and longer
while saves are getting longer, see `next_delay`): the broker spends at most
`max_busy_share` of its time saving, saves at least every `max_interval_s` and at most every
`min_interval_s`. What a `kill -9` of the broker loses is what arrived since the last save:
about a second's worth while the queue is small, up to `max_interval_s` under a backlog.

One pacer per broker: whoever holds the lock file paces; the others wait for it (several
`gridwarden` commands on one data dir, or the one that started the broker gone). The
embedded broker runs its own (`EmbeddedMosquitto.autosave`); for a broker of one's own on
the same host or in a shared pid namespace (deploy/), `gridwarden up` runs one when
`GRIDWARDEN_BROKER_PERSISTENCE_FILE` and `GRIDWARDEN_BROKER_PID_FILE` are set."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 60.0
MAX_BUSY_SHARE = 0.02
SAVE_TIMEOUT_S = 120.0  # a save not seen by then: the broker is gone or stuck; try again
POLL_S = 0.002
SLOW_SAVE_S = 0.5  # logged
# A save longer than this is a pause an alarm waiting in the broker feels: if it is also
# longer than the save before, it counts as a backlog building up (see `_growth`).
FELT_SAVE_S = 0.05
LOCK_FILE = "autosave.lock"  # next to the broker's pid file


def next_delay(
    took_s: float, *, growth: float = 0.0, min_s: float, max_s: float, busy_share: float
) -> float:
    """How long to wait after a save that took `took_s`, so that the next one takes at
    most `busy_share` of the time until it is done. `growth`: how much longer a save gets
    per second of waiting (a backlog building up, or draining: `AutosavePacer._growth`).
    The next save takes about took + growth × delay, so the delay d must satisfy
    d ≥ k (took + growth × d) with k = (1 - share) / share: without the growth term, a
    queue building up at 30,000 msg/s made each save ~4× as long as the last (26 ms,
    145 ms, 1,056 ms, measured) and the third stalled the broker for a second."""
    k = (1 - busy_share) / busy_share
    if k * growth >= 1:
        return max_s  # growing faster than the budget allows: as rarely as allowed
    return min(max_s, max(min_s, k * took_s / (1 - k * growth)))


@dataclass
class AutosaveStats:
    saves: int = 0  # paced (save_once called directly counts only in `recent`)
    last_delay_s: float = 0.0
    # (time.monotonic() when asked, seconds it took) of the latest saves
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def last_took_s(self) -> float:
        return self.recent[-1][1] if self.recent else 0.0

    def between(self, start: float, end: float) -> list[tuple[float, float]]:
        """The saves asked for in [start, end): (when, seconds it took)."""
        return [(at, took) for at, took in self.recent if start <= at < end]


class AutosavePacer:
    def __init__(
        self,
        persistence_file: Path,
        lock_file: Path,
        broker_pid: Callable[[], int | None],
        *,
        min_interval_s: float = MIN_INTERVAL_S,
        max_interval_s: float = MAX_INTERVAL_S,
        max_busy_share: float = MAX_BUSY_SHARE,
    ) -> None:
        self.persistence_file = persistence_file
        self.lock_file = lock_file
        self.broker_pid = broker_pid
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.max_busy_share = max_busy_share
        self.stats = AutosaveStats()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="broker-autosave", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop pacing (before the broker is stopped: it saves on SIGTERM by itself)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(SAVE_TIMEOUT_S)
            self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    @property
    def pacing(self) -> bool:
        return self._lock_fd is not None

    def save_once(self) -> float | None:
        """Ask the broker to save now; how long it was saving (from the new file appearing to
        its rename into place; the wait for the broker to act on the signal is not counted:
        an idle broker takes up to ~100 ms to wake), or None: no broker, or no save seen
        within `SAVE_TIMEOUT_S`."""
        pid = self.broker_pid()
        if pid is None:
            return None
        before = _identity(self.persistence_file)
        being_written = self.persistence_file.with_name(self.persistence_file.name + ".new")
        asked = time.monotonic()
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None
        started: float | None = None
        while _identity(self.persistence_file) == before:
            if started is None and being_written.exists():
                started = time.monotonic()
            if time.monotonic() - asked > SAVE_TIMEOUT_S or self._stopping.wait(POLL_S):
                return None
        done = time.monotonic()
        # A save shorter than one poll is never seen being written: count it as one poll.
        took = POLL_S if started is None else max(POLL_S, done - started)
        self.stats.recent.append((asked, took))
        return took

    def _run(self) -> None:
        delay = 0.0
        while not self._stopping.wait(delay):
            delay = self.min_interval_s
            if not self.pacing and not self._take_lock():
                continue
            took = self.save_once()
            if took is None:
                continue
            delay = next_delay(
                took,
                growth=self._growth(),
                min_s=self.min_interval_s,
                max_s=self.max_interval_s,
                busy_share=self.max_busy_share,
            )
            self.stats.saves += 1
            self.stats.last_delay_s = delay
            if took > SLOW_SAVE_S:
                log.info(
                    "the embedded Mosquitto took %.1f s to save its persistence file; "
                    "next save in %.0f s", took, delay,
                )  # fmt: skip

    def _growth(self) -> float:
        """Seconds of save time gained per second of waiting. Over the last three saves,
        the smaller of the two rates, so one slow save among cheap ones (the machine busy
        for a moment) does not read as a backlog building up; but a save long enough to be
        felt (`FELT_SAVE_S`) that is longer than the one before counts at once: waiting for
        a second rise let the next save, a few seconds later, take 0.5 s (saturated
        bench phase, 2026-12-03: 2, 69, 500 ms). Misread, it costs one save put off (up to
        `max_interval_s`); missed, a second-long stop of the broker."""
        recent = self.stats.recent
        if len(recent) < 2:
            return 0.0
        (at2, took2), (at3, took3) = recent[-2], recent[-1]
        latest = (took3 - took2) / max(at3 - at2, self.min_interval_s)
        if took3 > FELT_SAVE_S and latest > 0:
            return latest
        if len(recent) < 3:
            return 0.0
        at1, took1 = recent[-3]
        return min((took2 - took1) / max(at2 - at1, self.min_interval_s), latest)

    def _take_lock(self) -> bool:
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True


def autosave_task(
    persistence_file: Path, pid_file: Path
) -> Callable[[asyncio.Event], Coroutine[None, None, None]]:
    """A supervisor task pacing the saves of the broker whose pid is in `pid_file`."""
    pacer = AutosavePacer(persistence_file, pid_file.parent / LOCK_FILE, lambda: read_pid(pid_file))

    async def run(stop: asyncio.Event) -> None:
        pacer.start()
        try:
            await stop.wait()
        finally:
            await asyncio.to_thread(pacer.stop)

    return run


def read_pid(path: Path) -> int | None:
    """The pid on the first line of a pid file; None if there is none."""
    try:
        first = path.read_text(encoding="utf-8").split("\n", 1)[0].strip()
        return int(first) if first else None
    except (OSError, ValueError):
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (each save renames a new one into place)."""
    with contextlib.suppress(FileNotFoundError):
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    return None
