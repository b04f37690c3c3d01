"""RDTech UM25C/UM24C/UM34C binary profile: the frame parser on hand-made frames, and the real
logger polling a simulated meter through a pseudo-terminal (pyserial on the slave side).

The simulated meter is a thread on the pty master: it waits for the request byte 0xF0 and answers
with a 130-byte frame built by the encoder below, which is written from the protocol description
(struct layout), independently of the parser in ddi_hw.power.meters. A symlink plays the part of
/dev/serial/by-id/... so a replug (new pty) is found on the same path.
"""
import json
import math
import os
import select
import struct
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import quad

from ddi_hw.power.analysis import integrate, read_power
from ddi_hw.power.logger import make_logger, split_frames, status_path
from ddi_hw.power.meters import Shunt, get_profile, parse_um_frame

# model id -> (volt step V, amp step A); from the sigrok wiki / libsigrok rdtech-um driver
MODELS = {0x09C9: (0.001, 0.0001), 0x0963: (0.01, 0.001), 0x0D4C: (0.01, 0.001)}
PROFILE_OF = {0x09C9: "um25c", 0x0963: "um24c", 0x0D4C: "um34c"}
# libsigrok poll_csum_um34c: XOR of these byte positions is the UM34C's last byte
XOR_POS = [1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57, 59, 63, 67, 69, 73, 79,
           83, 89, 97, 99, 109, 111, 113, 119, 121, 127]


def encode(model_id, volts, amps, mw=None, bad_end=False):
    """A meter answer: >H id, >H volts, >H amps, >I mW, >H temp C, >H temp F, zeros, end marker."""
    vs, is_ = MODELS[model_id]
    v_cnt, i_cnt = round(volts / vs), round(amps / is_)
    if mw is None:
        mw = round(v_cnt * vs * i_cnt * is_ * 1000)
        if struct.pack(">I", mw).find(struct.pack(">H", model_id)) >= 0:
            # a power field holding the model id (UM25C: 2505 mW) would fake a second frame start; one
            # mW off is inside the parser's rounding check (firmware that truncates differs as much)
            mw += 1
    body = struct.pack(">HHHIHH", model_id, v_cnt, i_cnt, mw, 25, 77).ljust(128, b"\0")
    if model_id == 0x0D4C:
        x = 0
        for p in XOR_POS:
            x ^= body[p]
        end = bytes([0, x ^ (0x5A if bad_end else 0)])
    else:
        end = b"\xff\xf2" if bad_end else b"\xff\xf1"
    frame = body + end
    assert len(frame) == 130
    # keep counts exact: no second frame start may hide inside a frame
    assert frame.find(frame[:2], 1) < 0, "test values put a model id inside the frame"
    return frame


# ---------------------------------------------------------------- parser on hand-made frames


def _frame(head_hex: str, end_hex: str) -> bytes:
    head = bytes.fromhex(head_hex)
    return head + bytes(128 - len(head)) + bytes.fromhex(end_hex)


def test_parser_on_hand_made_frames():
    # UM25C: 0x1403 = 5123 mV, 0x11D7 = 4567 x 0.1 mA, 0x0924 = 2340 mW; 5.123 * 0.4567 = 2.3396741
    r = parse_um_frame(_frame("09c9 1403 11d7 00000924", "fff1"), Shunt())
    assert r.volts == pytest.approx(5.123, abs=1e-12) and r.amps == pytest.approx(0.4567, abs=1e-12)
    assert r.watts == pytest.approx(2.3396741, abs=1e-12) and r.meter_t is None
    # UM24C: 0x01F4 = 500 x 10 mV = 5.00 V, 0x0320 = 800 mA, 0x0FA0 = 4000 mW -> 4.0 W
    r = parse_um_frame(_frame("0963 01f4 0320 00000fa0", "fff1"), Shunt())
    assert (r.volts, r.amps) == (pytest.approx(5.0), pytest.approx(0.8))
    assert r.watts == pytest.approx(4.0, abs=1e-12)
    # UM34C: 0x0200 = 5.12 V, 0x0100 = 0.256 A, 0x051F = 1311 mW (5.12 * 0.256 = 1.31072 W);
    # checksum = XOR of bytes 1, 3, 7, 9 (others are 0) = 0x4C ^ 0x00 ^ 0x00 ^ 0x1F = 0x53
    r = parse_um_frame(_frame("0d4c 0200 0100 0000051f", "0053"), Shunt())
    assert r.watts == pytest.approx(1.31072, abs=1e-12)
    with pytest.raises(ValueError, match="end marker"):  # UM34C with a wrong checksum
        parse_um_frame(_frame("0d4c 0200 0100 0000051f", "0054"), Shunt())
    with pytest.raises(ValueError, match="end marker"):  # bad trailer
        parse_um_frame(_frame("09c9 1403 11d7 00000924", "fff2"), Shunt())
    with pytest.raises(ValueError, match="model id"):  # unknown model
        parse_um_frame(_frame("1234 1403 11d7 00000924", "fff1"), Shunt())
    with pytest.raises(ValueError, match="model id"):  # truncated
        parse_um_frame(_frame("09c9 1403 11d7 00000924", "fff1")[:129], Shunt())
    # power field 2000 mW vs V*I = 2.3397 W: off by 0.34 W, far beyond rounding (~2 mW)
    with pytest.raises(ValueError, match="disagrees"):
        parse_um_frame(_frame("09c9 1403 11d7 000007d0", "fff1"), Shunt())
    # 2341 mW is within rounding (|2.341 - 2.33967| = 1.3 mW < 1 + 0.46 + 0.51 mW): accepted
    assert parse_um_frame(_frame("09c9 1403 11d7 00000925", "fff1"), Shunt()).watts == pytest.approx(2.3396741)


def test_encoder_agrees_with_hand_made_frame():
    """The test's encoder and the hand-made bytes are the same frame (checks the encoder)."""
    assert encode(0x09C9, 5.123, 0.4567) == _frame("09c9 1403 11d7 00000924 0019 004d", "fff1")
    # the temperature bytes 11 and 13 are not XOR positions: same checksum as the hand-made 0x53
    assert encode(0x0D4C, 5.12, 0.256)[-1] == 0x53


def test_encoder_keeps_the_model_id_out_of_a_frame():
    """5.01 V x 0.5 A = 2505 mW = 0x09C9, the UM25C's id: the simulated meter sends 2506 mW (inside
    the parser's rounding check) rather than a frame with a second start in it (a CI run once hit
    this value on the known trace and the meter thread died)."""
    f = encode(0x09C9, 5.01, 0.5)
    assert f.find(f[:2], 1) < 0 and int.from_bytes(f[6:10], "big") == 2506
    assert parse_um_frame(f, Shunt()).watts == pytest.approx(2.505)


def test_split_frames_resyncs_and_counts():
    p = get_profile("um25c")
    good = encode(0x09C9, 5.0, 0.7)
    bad = encode(0x09C9, 5.0, 0.7, bad_end=True)
    split = lambda b: split_frames(b, p.frame_start, p.frame_len, p.frame_ok)  # noqa: E731
    frames, dropped, rest = split(b"\x01\x02\x03" + good + good[:10])
    assert frames == [good] and dropped == 3 and rest == good[:10]
    frames, dropped, rest = split(good[77:] + good)  # stream starting mid-frame
    assert frames == [good] and dropped == 53 and rest == b""
    frames, dropped, rest = split(bad + good)  # bad candidate returned, its bytes dropped
    assert frames == [bad, good] and dropped == 130 and rest == b""
    # a frame cut short (replug) followed by a whole one: the whole one must survive even though
    # it begins inside the 130-byte candidate that starts at the cut frame
    frames, dropped, rest = split(good[:100] + good)
    assert frames == [good[:100] + good[:30], good] and dropped == 100 and rest == b""
    frames, dropped, rest = split(b"\x55\x09")  # a trailing 0x09 may begin a frame: kept
    assert frames == [] and dropped == 1 and rest == b"\x09"
    frames, dropped, rest = split(good[:60])  # partial frame: waits
    assert frames == [] and dropped == 0 and rest == good[:60]


# ---------------------------------------------------------------- simulated meter on a pty


class UmMeterSim:
    """Answers each 0xF0 on the pty master with one frame of truth(t_request) = (volts, amps)."""

    def __init__(self, link: Path, model_id: int, truth, pieces: int = 1, piece_delay: float = 0.0):
        self.link, self.model_id, self.truth = link, model_id, truth
        self.pieces, self.piece_delay = pieces, piece_delay
        self.answers: list[dict] = []  # every answer sent, in order
        self.prefix = b""  # written before the next answer (a stream starting mid-frame)
        self.corrupt_next = False
        self.plugged = False
        self.plug()

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        tmp = self.link.with_name(self.link.name + ".new")
        os.symlink(os.ttyname(self.slave), tmp)
        os.replace(tmp, self.link)
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._serve, daemon=True)
        self._th.start()
        self.plugged = True

    def unplug(self) -> None:
        if self.plugged:
            self._stop.set()
            self._th.join(5)
            os.close(self.master)
            os.close(self.slave)
            self.plugged = False

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.master], [], [], 0.02)[0]:
                continue
            try:
                data = os.read(self.master, 256)
            except OSError:
                return
            for _ in range(data.count(0xF0)):
                self._answer()

    def _answer(self) -> None:
        t = time.monotonic()
        volts, amps = self.truth(t)
        bad, self.corrupt_next = self.corrupt_next, False
        frame = encode(self.model_id, volts, amps, bad_end=bad)
        data, self.prefix = self.prefix + frame, b""
        self.answers.append({"t": t, "volts": volts, "amps": amps, "bad": bad})
        cuts = np.linspace(0, len(data), self.pieces + 1).astype(int)
        for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            os.write(self.master, data[a:b])
            if k < self.pieces - 1:
                time.sleep(self.piece_delay)


def _wait(pred, timeout=10.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


@pytest.fixture
def teardown():
    """Stops loggers and simulated meters even when an assertion fails mid-test."""
    undo = []
    yield undo.append
    for fn in reversed(undo):
        fn()


def _start(logger, teardown):
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("c", logger.run(None)))
    th.start()
    teardown(lambda: (logger.stop.set(), th.join(5)))
    return th, result


@pytest.mark.parametrize("model_id", [0x09C9, 0x0963, 0x0D4C])
def test_frames_split_in_three_pieces_log_the_true_values(tmp_path, model_id, teardown):
    vs, is_ = MODELS[model_id]
    t0 = time.monotonic()
    truth = lambda t: (5.0 + 0.2 * math.sin(3 * (t - t0)), 0.7 + 0.15 * math.cos(2 * (t - t0)))  # noqa: E731
    sim = UmMeterSim(tmp_path / "meter", model_id, truth, pieces=3, piece_delay=0.015)
    teardown(lambda: sim.unplug())
    out = tmp_path / "um.csv"
    logger = make_logger(out, meter=PROFILE_OF[model_id], port=str(tmp_path / "meter"), batch_s=0.1)
    th, res = _start(logger, teardown)
    _wait(lambda: logger.counters.samples >= 12)
    logger.stop.set()
    th.join(60)  # a starved logger thread can take seconds to write its last batch
    assert not th.is_alive(), "the logger did not stop within 60 s"
    sim.unplug()

    c = res["c"]
    assert c.garbage_lines == 0 and c.garbage_bytes == 0 and c.timeouts == 0 and c.disconnects == 0
    power, bad = read_power(out)
    assert bad == 0 and len(power) == c.samples >= 12
    answers = sim.answers[:len(power)]  # the meter may have answered one request not yet read
    assert len(sim.answers) - len(power) <= 1
    v_true = np.array([a["volts"] for a in answers])
    i_true = np.array([a["amps"] for a in answers])
    # the meter rounds to its resolution: recorded values are within half a step of the truth
    assert np.all(np.abs(power.volts.to_numpy() - v_true) <= vs / 2 + 1e-9)
    assert np.all(np.abs(power.amps.to_numpy() - i_true) <= is_ / 2 + 1e-9)
    assert np.allclose(power.watts, power.volts * power.amps, rtol=1e-12)
    # each sample is stamped between the request and the end of its answer (3 pieces, 2 delays)
    lag = power.host_mono_s.to_numpy() - np.array([a["t"] for a in answers])
    assert np.all(np.abs(lag) < 0.5), lag


def test_mid_frame_start_corrupt_frame_and_replug_are_counted(tmp_path, teardown):
    link = tmp_path / "meter"
    seq = {"n": 0}

    def truth(t):  # the current encodes the answer's sequence number (0.1 mA steps)
        seq["n"] += 1
        return 5.0 + 0.1 * math.sin(t), 0.6 + 0.001 * seq["n"]

    sim = UmMeterSim(link, 0x09C9, truth, pieces=3, piece_delay=0.005)
    teardown(lambda: sim.unplug())
    out = tmp_path / "um.csv"
    logger = make_logger(out, meter="um25c", port=str(link), batch_s=0.1, min_interval_s=0.01)
    th, res = _start(logger, teardown)
    _wait(lambda: logger.counters.samples >= 5)
    sim.corrupt_next = True  # one answer with end marker 0xFFF2
    _wait(lambda: logger.counters.garbage_lines == 1)
    assert logger.counters.garbage_bytes == 130
    n_before_unplug = len(sim.answers)
    _wait(lambda: logger.counters.samples >= 10)
    sim.unplug()
    n_at_unplug = len(sim.answers)
    _wait(lambda: logger.counters.disconnects == 1)
    time.sleep(0.3)
    tail = encode(0x09C9, 5.0, 0.65)[130 - 57:]  # the end of a frame sent before the replug
    sim.prefix = tail
    sim.plug()
    _wait(lambda: logger.counters.reconnects == 1)
    n_after = logger.counters.samples
    _wait(lambda: logger.counters.samples >= n_after + 10)
    logger.stop.set()
    th.join(60)  # a starved logger thread can take seconds to write its last batch
    assert not th.is_alive(), "the logger did not stop within 60 s"
    sim.unplug()

    c = res["c"]
    assert c.garbage_lines == 1 and c.garbage_bytes == 130 + len(tail)
    assert c.disconnects == 1 and c.reconnects == 1
    status = json.loads(status_path(out).read_text())
    assert status["garbage_bytes"] == c.garbage_bytes and status["samples"] == c.samples
    power, bad = read_power(out)
    assert bad == 0 and len(power) == c.samples
    logged = np.rint((power.amps.to_numpy() - 0.6) / 0.001).astype(int)  # sequence numbers
    good = [k + 1 for k, a in enumerate(sim.answers) if not a["bad"]]
    assert np.all(np.diff(logged) > 0)  # in order, nothing twice
    assert set(logged) <= set(good)  # the corrupted answer never became a sample
    missing = set(good) - set(logged)
    # allowed losses: an answer in flight when the cable was pulled, and one at the final stop
    assert missing <= {n_at_unplug, len(sim.answers)}, (missing, n_before_unplug, n_at_unplug)
    # logging went on after the replug: samples from answers sent after it
    assert (logged > n_at_unplug).sum() >= 10


def _known_trace(tmp_path, teardown):
    """Log a known power trace from the simulated meter; return (measured, true, tolerance) in J."""
    tmp_path.mkdir()
    t0 = time.monotonic()
    f = 0.5  # Hz
    volts = lambda t: 5.0 + 0.3 * math.sin(2 * math.pi * f * (t - t0))  # noqa: E731
    amps = lambda t: 0.7 + 0.2 * math.sin(2 * math.pi * f * (t - t0) + 1.0)  # noqa: E731
    sim = UmMeterSim(tmp_path / "meter", 0x09C9, lambda t: (volts(t), amps(t)))
    teardown(lambda: sim.unplug())
    out = tmp_path / "um.csv"
    logger = make_logger(out, meter="um25c", port=str(tmp_path / "meter"), batch_s=0.1,
                         min_interval_s=0.02)
    th, res = _start(logger, teardown)
    # stop once the meter has answered past t0 + 2.4 s and at least 60 times (not at a fixed wall
    # time: on a loaded machine the logger can start late or be starved, and a fixed stop left it
    # too short a window or too few samples)
    deadline = t0 + 60.0
    while time.monotonic() < deadline and not (len(sim.answers) >= 60 and sim.answers[-1]["t"] >= t0 + 2.4):
        time.sleep(0.05)
    logger.stop.set()
    th.join(60)  # the last batch is written when the thread ends: a starved one can take seconds
    assert not th.is_alive(), "the logger did not stop within 60 s"
    sim.unplug()

    power, bad = read_power(out)
    assert bad == 0 and res["c"].garbage_bytes == 0 and len(power) > 40
    t, p = power.host_mono_s.to_numpy(), power.watts.to_numpy()
    # the window must have a sample on each side (a slow start or stop on a loaded machine shifts them)
    a, b = max(t0 + 0.3, t[0] + 0.05), min(t0 + 1.9, t[-1] - 0.05)
    assert b - a > 1.0, f"logged only {t[0] - t0:.2f}..{t[-1] - t0:.2f} s after start"
    measured = integrate(t, p, a, b)
    true, _ = quad(lambda s: volts(s) * amps(s), a, b, epsabs=1e-12)
    # tolerance, derived: (1) rounding to 1 mV / 0.1 mA; (2) each stamp's offset from the moment
    # the meter measured (known here: the simulator records it), weighted by its trapezoid share;
    # (3) linear interpolation between samples, |P''| h^2 / 8 over the window
    grid = np.linspace(a - 0.1, b + 0.1, 20001)
    pg = np.array([volts(s) * amps(s) for s in grid])
    d1 = np.max(np.abs(np.gradient(pg, grid)))
    d2 = np.max(np.abs(np.gradient(np.gradient(pg, grid), grid)))
    answers = sim.answers[:len(power)]
    offset = np.abs(t - np.array([x["t"] for x in answers]))
    inside = np.flatnonzero((t > a) & (t < b))
    idx = np.concatenate([[inside[0] - 1], inside, [inside[-1] + 1]])
    weight = np.gradient(t[idx]) if len(idx) > 2 else np.full(len(idx), b - a)
    h = float(np.max(np.diff(t[idx])))
    tol_round = (0.0005 * 0.9 + 5.3 * 0.00005 + 0.0005 * 0.00005) * (b - a)
    tol_stamp = d1 * float(np.sum(weight * offset[idx]))
    tol_interp = d2 * h ** 2 / 8 * (b - a)
    tol = tol_round + tol_stamp + tol_interp
    print(f"measured {measured:.5f} J, true {true:.5f} J, error {measured - true:+.5f} J, "
          f"tolerance {tol:.5f} J (rounding {tol_round:.5f}, stamps {tol_stamp:.5f}, "
          f"interpolation {tol_interp:.5f}); max dt {h * 1e3:.1f} ms")
    return measured, true, tol


def test_energy_of_a_known_trace_from_the_log(tmp_path, teardown):
    """Integrate the logged power with analysis.integrate; compare to the exact integral.

    The derived tolerance must hold on every capture. It is ~0.5 % of the energy on an idle
    machine and grows with the stamping delays of a loaded one, so a capture is repeated (up to
    three) until one is tight enough (< 5 %) to catch a wrong scale or a lost stretch of samples:
    a CI machine busy for a few seconds no longer fails the test, a wrong integral still does.
    """
    tols = []
    for k in range(3):
        measured, true, tol = _known_trace(tmp_path / f"try{k}", teardown)
        assert abs(measured - true) <= tol, (k, measured, true, tol)
        tols.append(tol / true)
        if tol < 0.05 * true:
            break
    assert min(tols) < 0.05, f"every capture was too loose to test anything: {tols}"
