"""Bad input, one category per test (issue 14): every case starts from the bad input and checks
exit 2 with exactly one stderr line and no traceback (or the exact recovery), and that files
which existed before are unchanged. CLI cases run the real `ddi-hw` in a subprocess; the power
logger reads a real pseudo-terminal."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

import numpy as np
import pytest

from ddi_hw.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ZEDBOARD = ROOT / "energy_models" / "presets" / "zedboard.yaml"


def ddi(*args, cwd, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "ddi_hw.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "MPLBACKEND": "Agg", "DDI_HW_CACHE": str(cwd / ".cache")}, **kw)


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def refused(res, *words) -> str:
    """Exit 2, exactly one stderr line starting 'error:', no traceback; the line names `words`."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


SMOKE_CFG = "arch: resnet14\ndataset: smoke\nsteps: 2\nbatch_size: 16\neval_batch_size: 100\n"


# ----------------------------------------------------------------------------- CLI numbers
@pytest.mark.parametrize("args,words", [
    (["train", "--config", "c.yaml", "--out", "run", "--lr", "inf"], ["--lr", "inf"]),
    (["train", "--config", "c.yaml", "--out", "run", "--target-saving", "nan"], ["--target-saving"]),
    (["eval", "run", "--batch-size", "0"], ["--batch-size"]),
    (["eval", "run", "--budgets", "nan,-5"], ["--budgets", "nan"]),
    (["run", "bundle", "--limit", "0"], ["--limit"]),
    (["profile", "--input-size", "0"], ["--input-size"]),
    (["power", "log", "--out", "p.csv", "--meter", "csv-stream", "--port", "x", "--duration", "nan"], ["--duration"]),
    (["power", "analyze", "p.csv", "w.csv", "--max-gap", "-1"], ["--max-gap"]),
    (["power", "analyze", "p.csv", "w.csv", "--clock", "utc"], ["--clock", "wall"]),
    (["train", "--config", "c.yaml", "--out", "run", "--steps", "abc"], ["--steps"]),  # a usage error too
])
def test_non_finite_or_out_of_range_numbers_are_refused_at_the_edge(tmp_path, args, words):
    (tmp_path / "c.yaml").write_text(SMOKE_CFG)
    before = snapshot(tmp_path)
    refused(ddi(*args, cwd=tmp_path), *words)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("line,field", [("lr: .inf", "'lr'"), ("momentum: .nan", "'momentum'"),
                                        ("lr: true", "'lr'"), ("steps: true", "'steps'")])
def test_config_numbers_must_be_finite_numbers(tmp_path, line, field):
    import yaml

    from ddi_hw.train import validate_config

    cfg = yaml.safe_load(SMOKE_CFG + line.replace("steps: true", "epochs: null\nsteps: true") + "\n")
    with pytest.raises(UserError, match=field):
        validate_config(cfg)


@pytest.mark.parametrize("old,new,field", [("mac_pj: 1.0", "mac_pj: .inf", "energy.mac_pj"),
                                           ("clock_hz: 200000000", "clock_hz: .nan", "clock_hz"),
                                           ("static_power_w: 0.05", "static_power_w: .inf", "static_power_w"),
                                           ("dram_pj: 200.0", "dram_pj: -1", "energy.dram_pj"),
                                           ("array_rows: 32", "array_rows: 1e300", "simulator.array_rows")])
def test_presets_with_non_finite_or_negative_coefficients_are_refused(tmp_path, old, new, field):
    from energy_models.presets import load_preset

    text = (ROOT / "energy_models" / "presets" / "eyeriss-65nm.yaml").read_text()
    assert old in text
    bad = tmp_path / "hw.yaml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_preset(bad)


# ----------------------------------------------------------------------------- paths
def test_unwritable_out_and_stale_run_files_are_refused_before_any_work(tmp_path):
    # the data set is missing too: an error naming --out (not the data) shows the order of checks
    (tmp_path / "c.yaml").write_text(SMOKE_CFG.replace("smoke", "cifar10"))
    (tmp_path / "blocker").write_text("x")
    before = snapshot(tmp_path)
    refused(ddi("train", "--config", "c.yaml", "--out", "blocker/run", "--data-dir", "nowhere", cwd=tmp_path),
            "--out", "blocker")
    refused(ddi("eval", "nowhere", "--out", "blocker/ev", cwd=tmp_path), "--out")
    assert snapshot(tmp_path) == before
    # a fresh run into a directory holding another run's metrics.csv: refused, file untouched
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,phase\n7,main\n")
    before = snapshot(tmp_path)
    refused(ddi("train", "--config", "c.yaml", "--out", "run", "--data-dir", "nowhere", cwd=tmp_path),
            "metrics.csv", "--resume")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- file schemas
@pytest.fixture(scope="module")
def run14(tmp_path_factory):
    from ddi_hw.train import train, validate_config

    root = tmp_path_factory.mktemp("hard")
    train(validate_config({"arch": "resnet14", "dataset": "smoke", "steps": 2, "batch_size": 16,
                           "eval_batch_size": 100}), root / "r14", show_progress=False)
    return root / "r14"


@pytest.mark.parametrize("edit,field", [
    (lambda s: s["model"].__setitem__("num_classes", "ten"), "model.num_classes"),
    (lambda s: s.pop("model"), "'model'"),
    (lambda s: s["config"].pop("dataset"), "config.dataset"),
    (lambda s: s["model"].__setitem__("layer_gates", "yes"), "model.layer_gates"),
])
def test_model_json_with_missing_or_wrong_typed_fields(tmp_path, run14, edit, field):
    import shutil

    run = tmp_path / "r14"
    shutil.copytree(run14, run)
    side = json.loads((run / "model.json").read_text())
    edit(side)
    (run / "model.json").write_text(json.dumps(side))
    before = snapshot(tmp_path)
    refused(ddi("eval", "r14", "--out", "ev", "--metrics", "flops", "--limit", "5", cwd=tmp_path), field)
    assert snapshot(tmp_path) == before


def test_resume_file_whose_state_lacks_keys(tmp_path, run14):
    import shutil

    from safetensors import safe_open
    from safetensors.numpy import load, save

    run = tmp_path / "r14"
    shutil.copytree(run14, run)
    (run / "model.safetensors").unlink()
    (run / "model.json").unlink()
    p = run / "resume.safetensors"
    with safe_open(str(p), framework="np") as f:
        meta = json.loads(f.metadata()["resume"])
    del meta["state"]["step"]
    p.write_bytes(save(load(p.read_bytes()), metadata={"resume": json.dumps(meta)}))
    (tmp_path / "c.yaml").write_text(SMOKE_CFG)
    before = snapshot(tmp_path)
    refused(ddi("train", "--config", "c.yaml", "--out", "r14", "--resume", cwd=tmp_path), "'step' is missing")
    assert snapshot(tmp_path) == before


def test_manifest_with_wrong_typed_fields(tmp_path):
    from ddi_hw.deploy.bundle import FORMAT, load_bundle
    from ddi_hw.deploy.regmap import load_regmap

    base = {"format": FORMAT, "regmap_version": load_regmap().version, "layers": [], "program": [],
            "tensors": {}, "blobs": {}}
    for change, field in [({"blobs": []}, "blobs"), ({"layers": "abc"}, "layers"),
                          ({"program": ["x"]}, "program"), ({"tensors": {"x": {"frac": "3"}}}, "tensors"),
                          ({"cost_plan": {"events": "x", "min_event": []}}, "cost_plan")]:
        (tmp_path / "manifest.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(UserError, match=field):
            load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(UserError, match="not UTF-8"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("cmd,files,words", [
    (["calibrate", "m.csv", "--out", "cal.yaml"],
     {"m.csv": "config,dram_accesses,sram_accesses,noc_accesses,rf_accesses,macs,cycles,energy_j\n"}, ["0 data rows"]),
    (["calibrate", "m.csv", "--out", "cal.yaml"],
     {"m.csv": "config,dram_accesses,sram_accesses,noc_accesses,rf_accesses,macs,cycles,energy_j\n"
               + "".join(f"c{i},0,0,0,0,0,0,0.001\n" for i in range(4))}, ["every count column is zero"]),
    (["calibrate", "m.csv", "--out", "cal.yaml"],
     {"m.csv": "config,dram_accesses,sram_accesses,noc_accesses,rf_accesses,macs,cycles,energy_j\n"
               + "a,1,1,1,1,inf,1,1\n"}, ["row 2", "'macs'"]),
    (["table1", "s.csv", "--out", "t1"], {"s.csv": ""}, ["empty"]),
    (["table1", "s.csv", "--out", "t1"],
     {"s.csv": "run,arch,stage,accuracy,compute_saving,energy_saving\na,resnet20,iadi,high,0.4,0.3\n"},
     ["'accuracy'"]),
    (["power", "analyze", "p.csv", "w.csv", "--out-dir", "pa"],
     {"p.csv": "host_wall_s,host_mono_s,meter_t_s,volts,amps,watts\n1,1,,,,3\n",
      "w.csv": b"kind,config,repeat,n_inferences,start_mono_s,end_mono_s,start_wall_s,end_wall_s\nrun,\xff,0,1,1,2,1,2\n"},
     ["not UTF-8"]),
    (["power", "analyze", "p.csv", "w.csv", "--out-dir", "pa"], {"p.csv": "", "w.csv": "x\n"}, ["empty"]),
])
def test_bad_csv_files_are_one_line_errors(tmp_path, cmd, files, words):
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "cal.yaml").write_text("earlier calibration\n")
    before = snapshot(tmp_path)
    refused(ddi(*cmd, cwd=tmp_path), *words)
    assert snapshot(tmp_path) == before


def test_power_log_with_one_garbled_byte_is_counted_not_fatal(tmp_path):
    from ddi_hw.power.analysis import read_power

    rows = "".join(f"{1000 + i},{i},,,,{3.0}\n" for i in range(10))
    (tmp_path / "p.csv").write_bytes(("host_wall_s,host_mono_s,meter_t_s,volts,amps,watts\n" + rows)
                                     .encode().replace(b"1003,3,,,,3.0", b"1003,3,,,,3.\xff0"))
    power, bad = read_power(tmp_path / "p.csv")
    assert len(power) == 9 and bad == 1 and 3 not in set(power.host_mono_s)


# ----------------------------------------------------------------------------- CIFAR unpickler
def _batch(array_opcodes: bytes) -> bytes:
    P = pickle
    return (P.PROTO + b"\x02" + P.EMPTY_DICT + P.MARK + P.SHORT_BINBYTES + b"\x04data" + array_opcodes
            + P.SHORT_BINBYTES + b"\x06labels" + P.EMPTY_LIST + P.SETITEMS + P.STOP)


def _glob(m, n):
    return pickle.GLOBAL + f"{m}\n{n}\n".encode()


def _empty_array():
    P = pickle
    return (_glob("numpy._core.multiarray", "_reconstruct") + _glob("numpy", "ndarray") + P.MARK + P.BININT1
            + b"\0" + P.TUPLE + P.SHORT_BINBYTES + b"\x01b" + P.TUPLE3 + P.REDUCE)


def _state(shape_ops: bytes, dtype: bytes, raw: bytes) -> bytes:
    P = pickle
    return (P.MARK + P.BININT1 + b"\x01" + shape_ops + _glob("numpy", "dtype") + P.SHORT_BINUNICODE
            + bytes([len(dtype)]) + dtype + P.NEWFALSE + P.NEWTRUE + P.TUPLE3 + P.REDUCE + P.NEWFALSE
            + P.SHORT_BINBYTES + bytes([len(raw)]) + raw + P.TUPLE + P.BUILD)


BIG = pickle.LONG1 + bytes([7]) + (2 ** 50).to_bytes(7, "little")
CRAFTED = {
    "2^50 elements through _reconstruct": _batch(
        _glob("numpy._core.multiarray", "_reconstruct") + _glob("numpy", "ndarray") + pickle.MARK + BIG
        + pickle.TUPLE + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE3 + pickle.REDUCE),
    "2^50 elements through ndarray()": _batch(_glob("numpy", "ndarray") + pickle.MARK + BIG + pickle.TUPLE
                                              + pickle.TUPLE1 + pickle.REDUCE),
    "2^40 x 3072 declared in the state": _batch(_empty_array() + _state(
        pickle.MARK + pickle.LONG1 + b"\x06" + (2 ** 40).to_bytes(6, "little") + pickle.BININT2
        + (3072).to_bytes(2, "little") + pickle.TUPLE, b"u1", b"abcd")),
    "float64 images": _batch(_empty_array() + _state(
        pickle.MARK + pickle.BININT1 + b"\x01" + pickle.BININT2 + (3072).to_bytes(2, "little") + pickle.TUPLE,
        b"f8", b"")),
    "object dtype": _batch(_empty_array() + _state(pickle.MARK + pickle.BININT1 + b"\x02" + pickle.TUPLE,
                                                   b"O8", b"")),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_cifar_unpickler_bounds_shapes_and_dtypes_before_allocating(tmp_path, kind):
    from ddi_hw import data

    c = tmp_path / "cifar"
    c.mkdir()
    for n in data.CIFAR10_TRAIN_FILES + data.CIFAR10_TEST_FILES:
        (c / n).write_bytes(CRAFTED[kind])
    t0 = time.monotonic()
    with pytest.raises(UserError, match="data_batch_1 is not a valid CIFAR-10 batch"):
        data.load_cifar10(c)
    assert time.monotonic() - t0 < 5  # refused from the declaration, nothing 2^50 was allocated


def test_cifar_unpickler_still_reads_the_real_format(tmp_path):
    from ddi_hw import data

    x = np.arange(5 * 3072, dtype=np.uint8).reshape(5, 3072)
    for proto in (2, 4):
        raw = pickle.dumps({b"data": x, b"labels": [0, 1, 2, 3, 9], b"batch_label": b"b"}, protocol=proto)
        obj = data.restricted_load(raw, "t")
        assert np.array_equal(obj[b"data"], x) and obj[b"labels"] == [0, 1, 2, 3, 9]
    big_endian = pickle.dumps({b"data": x, b"labels": np.array([1, 2, 3, 4, 5], dtype=">i8")}, protocol=2)
    assert data.restricted_load(big_endian, "t")[b"labels"].tolist() == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- calibrate
def test_calibrate_refuses_degenerate_systems_before_nnls():
    import pandas as pd

    from ddi_hw.calibrate import COUNT_COLUMNS, fit

    zero = pd.DataFrame({"config": ["a", "b"], **{c: [0.0, 0.0] for c in COUNT_COLUMNS}, "energy_j": [1e-3, 2e-3]})
    with pytest.raises(UserError, match="every count column is zero"):
        fit(zero, 1e8)
    # two configurations where DRAM and SRAM counts are proportional but MACs are not; the
    # collinear column is fixed, the rest identifiable: a fit, not a native abort
    ok = pd.DataFrame({"config": ["a", "b", "c"], "dram_accesses": [1.0, 2.0, 3.0], "sram_accesses": [2.0, 4.0, 6.0],
                       "noc_accesses": [0.0] * 3, "rf_accesses": [0.0] * 3, "macs": [5.0, 1.0, 7.0],
                       "cycles": [0.0] * 3, "energy_j": [1e-9, 2e-9, 3.5e-9]})
    res = fit(ok, 1e8, {"e_sram_pj": 1.0})
    assert np.isfinite(list(res.coef.values())).all()


# ----------------------------------------------------------------------------- power logger (real pty)
class Pty:
    def __init__(self, link: Path):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.symlink(os.ttyname(self.slave), link)

    def write(self, b: bytes) -> None:
        os.write(self.master, b)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def _lines(n: int) -> bytes:
    return "".join(f"{i * 0.01:.2f},12.0,0.{i % 9 + 1}\n" for i in range(n)).encode()


def _wait(pred, timeout=60.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _data_rows(path: Path) -> int:
    return sum(1 for _ in open(path)) - 1 if path.exists() else 0


@pytest.mark.parametrize("status", ['{"samples": "many"}', "[]", "{"])
def test_damaged_status_file_loses_only_counters(tmp_path, status):
    from ddi_hw.power.logger import make_logger, status_path

    out = tmp_path / "power.csv"
    out.write_text("host_wall_s,host_mono_s,meter_t_s,volts,amps,watts\n1.0,1.0,,,,2.5\n2.0,2.0,,,,2.5\n")
    status_path(out).write_text(status)
    pty = Pty(tmp_path / "tty")
    logger = make_logger(out, meter="csv-stream", port=str(tmp_path / "tty"), batch_s=0.05)
    note = logger.counters.notes[0]
    assert logger.counters.samples == 2 and ("damaged" in note or "unreadable" in note)  # rebuilt from the CSV
    import threading

    th = threading.Thread(target=logger.run, args=(None,))
    th.start()
    time.sleep(0.3)
    pty.write(_lines(50))
    _wait(lambda: _data_rows(out) == 52, 20)
    logger.stop.set()
    th.join(10)
    pty.close()
    saved = json.loads(status_path(out).read_text())
    assert saved["samples"] == 52 == _data_rows(out)


def _start_logger(tmp_path, *extra, ignore_sigint=False):
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "-m", "ddi_hw.cli", "power", "log", "--out", "power.csv",
                             "--meter", "csv-stream", "--port", "tty", *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pre)


@pytest.mark.parametrize("sig,ignore_sigint", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_signal_flushes_every_sample_read(tmp_path, sig, ignore_sigint):
    """SIGTERM, or SIGINT to a background logger that inherited SIGINT ignored: every line the
    meter sent before the signal is in the CSV, and it exits cleanly."""
    pty = Pty(tmp_path / "tty")
    proc = _start_logger(tmp_path, ignore_sigint=ignore_sigint)
    _wait(lambda: (tmp_path / "power.csv").exists())  # connected
    pty.write(_lines(400))
    time.sleep(0.4)  # read (but the 0.5 s batch may not be written yet)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    pty.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name}" in out
    assert _data_rows(tmp_path / "power.csv") == 400


def test_port_that_never_appears_is_an_error_and_leaves_no_file(tmp_path):
    proc = _start_logger(tmp_path, "--open-timeout", "1")
    out, err = proc.communicate(timeout=120)
    refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "did not open within 1 s")
    assert not (tmp_path / "power.csv").exists()


def test_a_log_without_samples_fails_with_the_likely_causes(tmp_path):
    pty = Pty(tmp_path / "tty")  # a port that opens but sends only garbage
    proc = _start_logger(tmp_path, "--duration", "1.5")
    _wait(lambda: (tmp_path / "power.csv").exists())
    pty.write(b"hello\nworld\n")
    out, err = proc.communicate(timeout=120)
    pty.close()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "logged 0 samples" in out and out.endswith("\n") and "samples  last" in out.splitlines()[0]
    assert err.startswith("warning: no samples read") and "garbage 2" in err and "--meter" in err


def test_line_buffer_is_bounded_and_over_long_garbage_counted(tmp_path):
    import threading

    from ddi_hw.power.logger import MAX_LINE_BYTES, make_logger

    out = tmp_path / "power.csv"
    pty = Pty(tmp_path / "tty")
    logger = make_logger(out, meter="csv-stream", port=str(tmp_path / "tty"), batch_s=0.05)
    th = threading.Thread(target=logger.run, args=(None,))
    th.start()
    time.sleep(0.3)
    garbage = 4 << 20
    writer = threading.Thread(target=lambda: (pty.write(b"x" * garbage + b"\n"), pty.write(_lines(30))))
    peak = []
    writer.start()
    while logger.counters.samples < 30:  # the buffer never holds more than one line's worth
        peak.append(len(logger.source._buf))
        assert len(peak) < 20000, "timed out"
        time.sleep(0.01)
    logger.stop.set()
    th.join(10)
    writer.join(10)
    pty.close()
    c = logger.counters
    assert c.garbage_lines == 1 and c.garbage_bytes == garbage + 1  # the whole over-long line
    assert max(peak) <= MAX_LINE_BYTES and _data_rows(out) == 30


# ----------------------------------------------------------------------------- names and cache
def test_preset_names_are_sanitised_for_paths(tmp_path):
    from ddi_hw.validate import safe_name

    assert safe_name("../../escape") == "_.._escape" and "/" not in safe_name("a/b") and safe_name("..") == "unnamed"
    (tmp_path / "hw.yaml").write_text(ZEDBOARD.read_text().replace("name: zedboard", "name: ../../escape"))
    work = tmp_path / "w"
    work.mkdir()
    res = ddi("profile", "--arch", "resnet14", "--hardware", "../hw.yaml", "--input-size", "8", cwd=work, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("cost_table.csv"))
    assert written == [Path("w/profile_out/resnet14-.._.._escape/cost_table.csv")]  # one path component


def test_cache_checksum_covers_key_and_a_directory_entry_is_handled(tmp_path):
    from energy_models import scalesim_runner as sr

    sim = dict(array_rows=4, array_cols=4, ifmap_sram_kb=64, filter_sram_kb=64, ofmap_sram_kb=64, dataflow="os")
    layer = sr.SimLayer(6, 6, 3, 3, 3, 4, 1)
    req = [(layer, "out", [1, 2, 3, 4], 1)]
    cold = sr.run_sweeps(req, sim, cache_dir=tmp_path, jobs=1)
    (entry,) = tmp_path.rglob("*.json")
    # forged: counts changed and the old counts-only checksum recomputed -> not trusted
    e = json.loads(entry.read_text())
    for v in e["counts"].values():
        v["macs"] += 1000
    e["checksum"] = hashlib.sha256(json.dumps(e["counts"], sort_keys=True).encode()).hexdigest()
    entry.write_text(json.dumps(e))
    assert sr.run_sweeps(req, sim, cache_dir=tmp_path, jobs=1) == cold
    # an entry that is a directory: recomputed, the directory left alone, no temp file behind
    entry.unlink()
    entry.mkdir()
    assert sr.run_sweeps(req, sim, cache_dir=tmp_path, jobs=1) == cold
    assert entry.is_dir() and [p for p in tmp_path.rglob("*") if "tmp" in p.name] == []
