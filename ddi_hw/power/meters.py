"""Meter profiles: how to talk to one kind of power meter and turn its text into watts.

A profile is data plus one parse function, so adding a meter is adding one entry here.
Two ways of reading exist in real meters and both are covered:
  * streaming: the meter pushes one line per sample (`csv-stream`);
  * polled SCPI: the host sends a query and reads one line back (`hp34401a-shunt` over RS-232,
    and any SCPI DMM over VISA, e.g. a Keysight 34465A).

Shunt meters measure the voltage across the ZedBoard's 10 mOhm J21 current-sense resistor in
the 12 V input; power is then P = V_supply * V_shunt / R_shunt (the supply is regulated, so
treating it as constant costs well under 1 %; pass the measured supply voltage for better).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

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
    parse: Callable[[str, Shunt], Reading]  # raises ValueError on a garbage line
    query: str | None = None  # polled meters: sent before each reading; None = meter streams
    init: tuple[str, ...] = ()  # sent after every (re)connect
    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1
    dsrdtr: bool = False
    line_end: str = "\n"  # what the host appends to commands
    extra: dict = field(default_factory=dict)


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
