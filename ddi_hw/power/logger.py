"""Power logger: meter samples -> append-only CSV that survives crashes, plus a status JSON.

Why it is built this way:
  * every batch is written, flushed and fsync'ed, so a crash loses at most one batch that was
    never written; a restart appends to the same file (header once, nothing rewritten);
  * intervals come from time.monotonic (immune to NTP steps); wall time is recorded too and a
    disagreement between the two is counted as a clock jump;
  * garbage lines, silent gaps, timeouts and disconnects are counted, never fatal: a lost meter
    is reopened with exponential backoff on the same path (use /dev/serial/by-id/... on a host);
  * binary meters (fixed-length answer frames) go through the same loop: the source cuts frames
    out of the byte stream, resynchronising on the frame start and end marker, and the bytes it
    skips are counted as garbage_bytes; text and frames share one parser slot and one writer.
"""
from __future__ import annotations

import csv
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ddi_hw.errors import UserError
from ddi_hw.power.meters import VISA_INIT, VISA_QUERY, MeterProfile, Shunt, parse_scpi_number
from energy_models.atomic import atomic_write_text

HEADER = ["host_wall_s", "host_mono_s", "meter_t_s", "volts", "amps", "watts"]
MAX_LINE_BYTES = 4096  # no meter line is this long; longer is garbage (see SerialSource._feed)


@dataclass
class Counters:
    """What went wrong (and right) while logging; saved as <out>.status.json after each batch."""

    samples: int = 0
    batches: int = 0
    garbage_lines: int = 0  # unparseable lines, or rejected frames of a binary meter
    garbage_bytes: int = 0  # binary meters: bytes skipped while resynchronising on a frame
    timeouts: int = 0
    gaps: int = 0
    gap_seconds: float = 0.0
    disconnects: int = 0
    reconnects: int = 0
    open_failures: int = 0
    clock_jumps: int = 0
    sessions: int = 0
    last_watts: float | None = None
    last_host_wall_s: float | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


def _valid_counters(saved) -> bool:
    """Every known field of a status JSON has its Counters type (unknown fields are ignored)."""
    if not isinstance(saved, dict):
        return False
    for name, f in Counters.__dataclass_fields__.items():
        if name not in saved:
            continue
        v, kind = saved[name], f.type
        if kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
        elif kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        elif kind == "float | None":
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
        elif kind == "str":
            ok = isinstance(v, str)
        else:  # notes
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        if not ok:
            return False
    return True


def status_path(out: Path) -> Path:
    return out.with_name(out.name + ".status.json")


def count_samples(path: Path) -> int:
    """Rows of a power log with a readable watts value (what read_power keeps): the sample
    counter rebuilt when the status file is lost or damaged."""
    n = 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.reader(f):
            try:
                ok = len(row) == len(HEADER) and all(math.isfinite(float(row[i])) for i in (0, 1, 5))
            except ValueError:
                ok = False
            n += ok
    return n


class PowerCsv:
    """Append-only sample file: header written once, each batch flushed and fsync'ed."""

    @staticmethod
    def check(path: Path) -> tuple[bool, bool]:
        """(fresh, ends with a newline) of a log we may append to; a foreign file is refused."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"--out {path} is a directory; give a CSV file name")
        fresh = not path.exists() or path.stat().st_size == 0
        ends_clean = True
        if not fresh:
            with open(path, "rb") as f:
                first = f.readline(4096).decode("utf-8", "replace").strip()
                f.seek(0, os.SEEK_END)
                f.seek(f.tell() - 1)
                ends_clean = f.read(1) == b"\n"
            if first.split(",") != HEADER:
                raise UserError(
                    f"{path} exists but is not a power log (header {first[:60]!r}); "
                    "choose another --out"
                )
        return fresh, ends_clean

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh, ends_clean = self.check(self.path)
        self._f = open(self.path, "a", newline="", encoding="utf-8")
        self._w = csv.writer(self._f)
        if fresh:
            self._w.writerow(HEADER)
            self._sync()
        elif not ends_clean:  # a crash cut the last row: end it so it stays one bad row
            self._f.write("\n")
            self._sync()

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, rows: list[tuple]) -> None:
        if rows:
            self._w.writerows(rows)
            self._sync()

    def close(self) -> None:
        self._f.close()


def _opt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def split_frames(buf: bytes, start: bytes, length: int,
                 ok: Callable[[bytes], bool]) -> tuple[list[bytes], int, bytes]:
    """Cut fixed-length frames out of a byte stream: (candidates, dropped, rest).

    A candidate is `length` bytes beginning with `start`. A good one (`ok`) is consumed whole; a
    bad one is still returned, so the parser rejects and counts it, but only its first byte is
    consumed, so a real frame beginning inside it is not lost. Bytes that cannot begin a frame
    are dropped and counted; `rest` is a possible frame start still waiting for its bytes.
    """
    out, dropped, i, n = [], 0, 0, len(buf)
    while True:
        j = buf.find(start, i)
        if j < 0:  # no start left; keep a tail that may be the first bytes of one
            k = max(i, n - len(start) + 1)
            while k < n and not start.startswith(buf[k:]):
                k += 1
            return out, dropped + k - i, buf[k:]
        dropped += j - i
        if n - j < length:
            return out, dropped, buf[j:]
        frame = buf[j:j + length]
        out.append(frame)
        if ok(frame):
            i = j + length
        else:
            i, dropped = j + 1, dropped + 1


class SerialSource:
    """A serial meter (pyserial). Streaming profiles push lines; polled ones answer a query;
    binary ones answer a request with a fixed-length frame."""

    def __init__(self, port: str, profile: MeterProfile, timeout: float = 0.5,
                 baudrate: int | None = None):
        self.port, self.profile, self.timeout = port, profile, timeout
        self.baudrate = baudrate or profile.baudrate
        self.ser = None
        self._buf = b""
        self._discarding = False  # inside an over-long line: drop bytes up to its newline
        self.idle = False  # the last read() got no bytes at all (counted as a timeout)
        self.dropped_bytes = 0  # skipped bytes (frame resync, over-long lines) not yet taken by the logger
        self.dropped_lines = 0  # over-long lines dropped, not yet taken by the logger
        self.errors: tuple[type[BaseException], ...] = (OSError,)

    @property
    def label(self) -> str:
        return f"serial:{self.port}:{self.profile.name}"

    def open(self) -> None:
        import serial

        self.errors = (OSError, serial.SerialException)
        p = self.profile
        self.ser = serial.Serial(self.port, baudrate=self.baudrate, bytesize=p.bytesize,
                                 parity=p.parity, stopbits=p.stopbits, dsrdtr=p.dsrdtr,
                                 timeout=self.timeout)
        self._buf = b""
        for cmd in p.init:
            self.ser.write((cmd + p.line_end).encode("ascii"))

    def close(self) -> None:
        if self.ser is not None:
            try:
                self.ser.close()
            except Exception:  # closing a vanished device must not stop the logger
                pass
        self.ser = None

    def take_dropped(self) -> int:
        n, self.dropped_bytes = self.dropped_bytes, 0
        return n

    def take_dropped_lines(self) -> int:
        n, self.dropped_lines = self.dropped_lines, 0
        return n

    def read(self) -> list[tuple[str | bytes, float, float]]:
        """Complete lines (or frames) with host (mono, wall) stamps; [] on timeout.
        Raises on disconnect."""
        p = self.profile
        if p.binary:
            return self._read_frames()
        if p.query is None:
            data = self.ser.read(max(1, self.ser.in_waiting))
            self.idle = not data
            mono, wall = time.monotonic(), time.time()
            return self._lines(data, mono, wall)
        t0m, t0w = time.monotonic(), time.time()
        self.ser.write((p.query + p.line_end).encode("ascii"))
        self.idle = False
        deadline = t0m + self.timeout
        while time.monotonic() < deadline:
            done = self._feed(self.ser.read(max(1, self.ser.in_waiting)))
            if done:
                # a polled reading is stamped at the middle of its query/answer exchange
                m, w = time.monotonic(), time.time()
                return [(d.decode("ascii", "replace"), (t0m + m) / 2, (t0w + w) / 2) for d in done]
        self.idle = True  # no complete answer within the timeout
        return []

    def _lines(self, data: bytes, mono: float, wall: float) -> list[tuple[str, float, float]]:
        return [(d.decode("ascii", "replace"), mono, wall) for d in self._feed(data)]

    def _feed(self, data: bytes) -> list[bytes]:
        """Complete lines from the stream, in time linear in the bytes. A line longer than
        MAX_LINE_BYTES is garbage: dropped up to its newline, counted once as a line and per byte,
        so a meter spewing bytes without newlines cannot grow memory or stall the logger."""
        parts = data.split(b"\n")
        done = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if self._discarding:
                self.dropped_bytes += len(part) + (not last)
                self._discarding = last
                continue
            if len(self._buf) + len(part) > MAX_LINE_BYTES:
                self.dropped_bytes += len(self._buf) + len(part) + (not last)
                self.dropped_lines += 1
                self._buf = b""
                self._discarding = last
                continue
            if last:
                self._buf += part
            else:
                done.append(self._buf + part)
                self._buf = b""
        return done

    def _read_frames(self) -> list[tuple[bytes, float, float]]:
        """Send the request; read until a good frame, a complete garbage answer, or the timeout.

        Reads are partial, so bytes accumulate in the buffer across calls; candidates that fail
        their end-marker check are returned too (the parser counts them as garbage).
        """
        p = self.profile
        t0m, t0w = time.monotonic(), time.time()
        self.ser.write(p.request)
        self.idle = False
        deadline, got, out = t0m + self.timeout, 0, []
        while True:
            data = self.ser.read(max(1, self.ser.in_waiting))
            got += len(data)
            frames, dropped, self._buf = split_frames(self._buf + data, p.frame_start,
                                                      p.frame_len, p.frame_ok)
            self.dropped_bytes += dropped
            if frames:
                # stamped at the middle of the request/answer exchange, like polled SCPI
                m, w = time.monotonic(), time.time()
                out += [(f, (t0m + m) / 2, (t0w + w) / 2) for f in frames]
            if any(p.frame_ok(f) for f in frames):
                return out
            if got >= p.frame_len and not self._buf:
                return out  # a whole answer arrived and none of it was a frame: don't wait
            if time.monotonic() >= deadline:
                self.idle = not out
                return out


class VisaSource:
    """A SCPI DMM over VISA (pyvisa), e.g. a 34465A reading the J21 shunt voltage."""

    def __init__(self, address: str, backend: str = "", timeout: float = 2.0):
        self.address, self.backend, self.timeout = address, backend, timeout
        self.rm = self.inst = None
        self.errors: tuple[type[BaseException], ...] = (OSError,)

    @property
    def label(self) -> str:
        return f"visa:{self.address}"

    def open(self) -> None:
        import pyvisa

        self.errors = (OSError, pyvisa.errors.VisaIOError, pyvisa.errors.InvalidSession)
        if self.rm is None:
            self.rm = pyvisa.ResourceManager(self.backend) if self.backend else pyvisa.ResourceManager()
        self.inst = self.rm.open_resource(self.address)
        self.inst.timeout = int(self.timeout * 1000)
        self.inst.read_termination = "\n"
        self.inst.write_termination = "\n"
        for cmd in VISA_INIT:
            self.inst.write(cmd)

    def close(self) -> None:
        if self.inst is not None:
            try:
                self.inst.close()
            except Exception:
                pass
        self.inst = None

    def read(self) -> list[tuple[str, float, float]]:
        t0m, t0w = time.monotonic(), time.time()
        text = self.inst.query(VISA_QUERY)
        m, w = time.monotonic(), time.time()
        return [(text, (t0m + m) / 2, (t0w + w) / 2)]


class PowerLogger:
    """Reads a source until `duration` or `stop` and appends samples to `out` in batches."""

    def __init__(self, source, parse: Callable, out: Path, shunt: Shunt = Shunt(),
                 batch_s: float = 0.5, gap_s: float = 0.5, jump_s: float = 0.5,
                 min_interval_s: float = 0.0, backoff_max_s: float = 2.0,
                 clock: Callable[[], tuple[float, float]] | None = None,
                 open_timeout_s: float | None = 10.0):
        self.source, self.parse, self.shunt = source, parse, shunt
        # the meter must open once within this time (a later loss is retried forever)
        self.open_timeout_s = open_timeout_s
        self.out = Path(out)
        self.batch_s, self.gap_s, self.jump_s = batch_s, gap_s, jump_s
        self.min_interval_s, self.backoff_max_s = min_interval_s, backoff_max_s
        # clock(mono, wall) -> (mono, wall): identity on a host; tests shift wall time here
        self.clock = clock or (lambda m, w: (m, w))
        self.counters = self._load_counters()
        self.stop = threading.Event()

    def _load_counters(self) -> Counters:
        """Counters of earlier sessions. A missing or damaged status file only loses counters,
        never samples: the sample count is then rebuilt from the CSV itself."""
        path = status_path(self.out)
        if not self.out.is_file():
            return Counters()
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if _valid_counters(saved):
                return Counters(**{k: v for k, v in saved.items() if k in Counters.__dataclass_fields__})
            note = f"{path.name} was damaged; counters restarted, samples recounted from the CSV"
        except FileNotFoundError:
            note = ""
        except (OSError, ValueError):
            note = f"{path.name} was unreadable; counters restarted, samples recounted from the CSV"
        c = Counters(samples=count_samples(self.out))
        if note:
            c.notes.append(note)
        return c

    def _write_status(self) -> None:
        # rewritten every batch; only counters (the samples file is fsync'ed): atomic, not synced
        atomic_write_text(status_path(self.out), json.dumps(asdict(self.counters), indent=1), fsync=False)

    def run(self, duration: float | None = None,
            on_batch: Callable[[Counters], None] | None = None) -> Counters:
        c = self.counters
        PowerCsv.check(self.out)  # a foreign --out is refused before the meter is touched
        sink = None  # opened at the first connection: a meter that never appears leaves no file
        t_start = time.monotonic()
        t_end = None if duration is None else t_start + duration
        rows: list[tuple] = []
        last_flush = time.monotonic()
        prev: tuple[float, float] | None = None  # (mono, wall) of the previous sample
        backoff, connected, ever_connected = 0.1, False, False
        try:
            while not self.stop.is_set() and (t_end is None or time.monotonic() < t_end):
                if not connected:
                    try:
                        self.source.open()
                    except Exception as err:  # device absent or busy: retry with backoff
                        c.open_failures += 1
                        if c.open_failures == 1 or c.open_failures % 50 == 0:
                            c.notes.append(f"open failed: {type(err).__name__}: {err}"[:200])
                        if not ever_connected and self.open_timeout_s is not None \
                                and time.monotonic() - t_start >= self.open_timeout_s:
                            raise UserError(f"{self.source.label} did not open within {self.open_timeout_s:g} s "
                                            f"({type(err).__name__}: {str(err)[:100]}); check the cable and "
                                            "--port/--visa, or wait longer with --open-timeout") from None
                        self.stop.wait(backoff)
                        backoff = min(backoff * 2, self.backoff_max_s)
                        continue
                    connected, backoff = True, 0.1
                    if ever_connected:
                        c.reconnects += 1
                    else:
                        sink = PowerCsv(self.out)
                        c.sessions += 1
                        c.source = self.source.label
                    ever_connected = True
                try:
                    lines = self.source.read()
                except self.source.errors:
                    c.disconnects += 1
                    self.source.close()
                    connected = False
                    continue
                finally:
                    c.garbage_bytes += self._take_dropped()
                    take_lines = getattr(self.source, "take_dropped_lines", None)
                    c.garbage_lines += take_lines() if take_lines is not None else 0
                if not lines and getattr(self.source, "idle", True):
                    c.timeouts += 1
                n_before = c.samples
                for raw, mono, wall in lines:  # raw: a text line, or a frame of a binary meter
                    mono, wall = self.clock(mono, wall)
                    try:
                        r = self.parse(raw, self.shunt)
                    except ValueError:
                        c.garbage_lines += 1
                        continue
                    if prev is not None:
                        dm, dw = mono - prev[0], wall - prev[1]
                        if dm > self.gap_s:
                            c.gaps += 1
                            c.gap_seconds += dm
                        if abs(dw - dm) > self.jump_s:
                            c.clock_jumps += 1
                    prev = (mono, wall)
                    rows.append((repr(wall), repr(mono), _opt(r.meter_t), _opt(r.volts),
                                 _opt(r.amps), repr(float(r.watts))))
                    c.samples += 1
                    c.last_watts, c.last_host_wall_s = r.watts, wall
                now = time.monotonic()
                if now - last_flush >= self.batch_s and sink is not None:
                    self._flush(sink, rows, on_batch)
                    rows, last_flush = [], now
                if self.source_is_polled:
                    # an instrument answering only garbage must not spin a core
                    pause = self.min_interval_s if c.samples > n_before else max(self.min_interval_s, 0.01)
                    if pause > 0:
                        self.stop.wait(pause)
        finally:
            if sink is not None:
                self._flush(sink, rows, on_batch)
                sink.close()
            self.source.close()
        return c

    @property
    def source_is_polled(self) -> bool:
        profile = getattr(self.source, "profile", None)
        return profile is None or profile.polled  # no profile: VISA, always polled

    def _take_dropped(self) -> int:
        take = getattr(self.source, "take_dropped", None)
        return take() if take is not None else 0

    def _flush(self, sink: PowerCsv, rows: list[tuple], on_batch) -> None:
        sink.append(rows)
        self.counters.batches += 1
        self._write_status()
        if on_batch is not None:
            on_batch(self.counters)


def make_logger(out: Path, meter: str | None = None, port: str | None = None,
                visa: str | None = None, visa_backend: str = "", shunt: Shunt = Shunt(),
                baudrate: int | None = None, **kw) -> PowerLogger:
    """One place that turns CLI-style choices into a logger (serial profile or VISA DMM)."""
    from ddi_hw.power.meters import get_profile

    if (visa is None) == (port is None):
        raise UserError("give exactly one of --port (serial meter) or --visa (VISA DMM address)")
    if visa is not None:
        return PowerLogger(VisaSource(visa, visa_backend), parse_scpi_number, out, shunt, **kw)
    if meter is None:
        raise UserError("--meter is required with --port: e.g. --meter csv-stream")
    profile = get_profile(meter)
    return PowerLogger(SerialSource(port, profile, baudrate=baudrate), profile.parse, out,
                       shunt, **kw)
