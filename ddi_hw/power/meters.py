"""Meter profiles: how to talk to one kind of power meter and turn its text into watts.

A profile is data plus one parse function, so adding a meter is adding one entry here.
Three ways of reading exist in real meters and all are covered:
  * streaming: the meter pushes one line per sample (`csv-stream`);
  * polled SCPI: the host sends a query and reads one line back (`hp34401a-shunt` over RS-232,
    and any SCPI DMM over VISA, e.g. a Keysight 34465A);
  * polled binary: the host sends a request byte and reads a fixed-length frame back
    (`um25c`, `um24c`, `um34c`: RDTech USB power meters over USB-serial or Bluetooth rfcomm).

Shunt meters measure the voltage across the ZedBoard's 10 mOhm J21 current-sense resistor in
the 12 V input; power is then P = V_supply * V_shunt / R_shunt (the supply is regulated, so
treating it as constant costs well under 1 %; pass the measured supply voltage for better).

The RDTech UM meters sit in a USB power path (4-24 V) and report volts and amps themselves, so
the shunt settings do not apply to them; they measure a board only when it is powered through
USB (e.g. a USB-PD trigger cable feeding its barrel jack). Bluetooth models appear as
/dev/rfcomm0 after `rfcomm bind`; the baud rate then does not matter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ddi_hw.errors import UserError


@dataclass(frozen=True)
class Reading:
    """One parsed sample. `meter_t` is the meter's own clock (None when it sends none)."""

    watts: float
    volts: float | None = None
    amps: float | None = None
    meter_t: float | None = None


@dataclass(frozen=True)
class Shunt:
    """Current-sense shunt in the supply line (ZedBoard J21: 10 mOhm in the 12 V input)."""

    supply_v: float = 12.0
    ohms: float = 0.010

    def reading(self, v_shunt: float) -> Reading:
        amps = v_shunt / self.ohms
        return Reading(watts=self.supply_v * amps, volts=self.supply_v, amps=amps)


@dataclass(frozen=True)
class MeterProfile:
    name: str
    description: str
    # a text line (or, for binary profiles, one frame of frame_len bytes) -> Reading;
    # raises ValueError on garbage
    parse: Callable[[Any, Shunt], Reading]
    query: str | None = None  # polled meters: sent before each reading; None = meter streams
    init: tuple[str, ...] = ()  # sent after every (re)connect
    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1
    dsrdtr: bool = False
    line_end: str = "\n"  # what the host appends to commands
    # binary profiles: `request` is written before each reading and the answer is a frame of
    # `frame_len` bytes that begins with `frame_start`; `frame_ok` checks its end marker
    request: bytes | None = None
    frame_len: int = 0
    frame_start: bytes = b""
    frame_ok: Callable[[bytes], bool] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def binary(self) -> bool:
        return self.frame_len > 0

    @property
    def polled(self) -> bool:
        return self.query is not None or self.request is not None


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    return x


def parse_csv_stream(line: str, shunt: Shunt) -> Reading:
    """Generic stream: `t,volts,amps` or `t,watts` (t = meter seconds). Header lines are garbage."""
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) == 3:
        t, v, a = (_finite(float(p)) for p in parts)
        return Reading(watts=v * a, volts=v, amps=a, meter_t=t)
    if len(parts) == 2:
        t, w = (_finite(float(p)) for p in parts)
        return Reading(watts=w, meter_t=t)
    raise ValueError(f"expected 't,volts,amps' or 't,watts', got {len(parts)} fields")


def parse_scpi_number(line: str, shunt: Shunt) -> Reading:
    """SCPI DMM reading of the shunt voltage, e.g. '+1.23456789E-03'. 9.9E37 means overload."""
    text = line.strip()
    if not text:
        raise ValueError("empty reading")
    v = _finite(float(text.split(",")[0]))
    if abs(v) >= 9.9e37:
        raise ValueError("overload (9.9E+37): choose a larger DMM range")
    return shunt.reading(v)


# RDTech UM24C / UM25C / UM34C. Sources (cross-checked, they agree): libsigrok
# src/hardware/rdtech-um/protocol.[ch] (sigrok wiki "RDTech UM series"), kolinger/rd-usb
# interfaces/um.py, valletw/pyummeter ummeter.py. 9600 baud 8N1; the host sends 0xF0 and the
# meter answers 130 bytes, big-endian: [0:2] model id, [2:4] volts (UM25C 1 mV, others 10 mV),
# [4:6] amps (UM25C 0.1 mA, others 1 mA), [6:10] power in mW. UM24C and UM25C end with the fixed
# marker 0xFFF1; the UM34C instead ends with an XOR checksum of the bytes at UM34C_XOR_POSITIONS
# (libsigrok poll_csum_um34c).
@dataclass(frozen=True)
class UmModel:
    name: str
    volt_step: float  # V per count
    amp_step: float  # A per count


UM_MODELS = {
    0x0963: UmModel("UM24C", 0.01, 0.001),
    0x09C9: UmModel("UM25C", 0.001, 0.0001),
    0x0D4C: UmModel("UM34C", 0.01, 0.001),
}
UM_FRAME_LEN = 130
UM_REQUEST = b"\xf0"
UM_POWER_STEP_W = 0.001  # the frame's own power field counts mW
UM34C_XOR_POSITIONS = (1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57, 59, 63, 67,
                       69, 73, 79, 83, 89, 97, 99, 109, 111, 113, 119, 121, 127)


def um34c_checksum(frame: bytes) -> int:
    x = 0
    for i in UM34C_XOR_POSITIONS:
        x ^= frame[i]
    return x


def um_frame_ok(frame: bytes) -> bool:
    """Length, known model id and the model's end marker (0xFFF1, or the UM34C checksum)."""
    if len(frame) != UM_FRAME_LEN:
        return False
    model_id = int.from_bytes(frame[0:2], "big")
    if model_id not in UM_MODELS:
        return False
    if model_id == 0x0D4C:
        return frame[-1] == um34c_checksum(frame)
    return frame[-2:] == b"\xff\xf1"


def parse_um_frame(frame: bytes, shunt: Shunt) -> Reading:
    """One RDTech UM answer frame -> Reading (watts = V * I, the meter measures the load directly).

    The frame's own mW field must agree with V * I within the three fields' resolutions (full
    steps, so truncating and rounding firmware both pass); a larger mismatch means a corrupted
    frame that happened to keep a valid end marker. `shunt` is unused: the meter is in the line.
    """
    if not um_frame_ok(frame):
        raise ValueError("not a valid RDTech UM frame (length, model id or end marker)")
    model = UM_MODELS[int.from_bytes(frame[0:2], "big")]
    volts = int.from_bytes(frame[2:4], "big") * model.volt_step
    amps = int.from_bytes(frame[4:6], "big") * model.amp_step
    meter_w = int.from_bytes(frame[6:10], "big") * UM_POWER_STEP_W
    watts = volts * amps
    tol = (model.volt_step * amps + volts * model.amp_step + model.volt_step * model.amp_step
           + UM_POWER_STEP_W)
    if abs(watts - meter_w) > tol:
        raise ValueError(f"{model.name} power field {meter_w:.3f} W disagrees with "
                         f"V*I = {watts:.4f} W by more than rounding ({tol:.4f} W)")
    return Reading(watts=watts, volts=volts, amps=amps)


def _um_profile(model_id: int) -> MeterProfile:
    model = UM_MODELS[model_id]
    return MeterProfile(
        name=model.name.lower(),
        description=(f"RDTech {model.name} USB power meter (USB-serial or Bluetooth rfcomm), "
                     f"polled with 0xF0, {model.volt_step * 1e3:g} mV / "
                     f"{model.amp_step * 1e3:g} mA resolution"),
        parse=parse_um_frame,
        baudrate=9600,
        request=UM_REQUEST,
        frame_len=UM_FRAME_LEN,
        frame_start=model_id.to_bytes(2, "big"),
        frame_ok=um_frame_ok,
    )


PROFILES: dict[str, MeterProfile] = {
    "csv-stream": MeterProfile(
        name="csv-stream",
        description="any meter or microcontroller streaming 't,volts,amps' or 't,watts' lines",
        parse=parse_csv_stream,
    ),
    # HP/Agilent 34401A User's Guide, ch. 4 "RS-232 Interface Configuration": 9600 baud,
    # 8 data bits no parity, 2 stop bits, DTR/DSR handshake, SYST:REM before remote commands,
    # commands end in <new line>, readings come back as '+1.23456789E-03' CR LF.
    "hp34401a-shunt": MeterProfile(
        name="hp34401a-shunt",
        description="HP/Agilent 34401A over RS-232 reading the J21 shunt voltage (SCPI READ?)",
        parse=parse_scpi_number,
        query="READ?",
        init=("SYST:REM", "CONF:VOLT:DC 0.1", "VOLT:DC:NPLC 0.2", "TRIG:SOUR IMM"),
        baudrate=9600,
        stopbits=2,
        dsrdtr=True,
    ),
    "um25c": _um_profile(0x09C9),
    "um24c": _um_profile(0x0963),
    "um34c": _um_profile(0x0D4C),
}

# SCPI commands for a 34465A-class DMM reached through VISA (USB-TMC / LAN): same parse.
VISA_INIT = ("*CLS", "CONF:VOLT:DC 0.1", "VOLT:DC:NPLC 0.2", "TRIG:SOUR IMM")
VISA_QUERY = "READ?"


def get_profile(name: str) -> MeterProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UserError(
            f"unknown meter profile {name!r}: choose one of {', '.join(sorted(PROFILES))}"
        ) from None
