"""Interrupt and resume (issue 20 item 3): lrq-calibrate --resume and lrq-convert --resume.

A run is SIGKILLed as soon as its first finished layer is in the resume directory; the same
command again must end with the file an uninterrupted run writes, byte for byte (the reference:
an uninterrupted run without any resume directory).  A resume with another option or another
input is refused naming it; a damaged layer file is refused naming it (not recomputed: the
layers after it were computed from it, and a file the atomic writer left complete can only have
been damaged by something the user should hear about).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrq.calib.calibrate import CalibrateOptions, calibrate
from lrq.cli import calibrate as calibrate_cli
from lrq.cli import convert as convert_cli
from lrq.convert import ConvertOptions, convert
from lrq.resume import LAYER_FILE, MANIFEST

N_WIN, WINDOW = 4, 128           # 512 calibration tokens, as in tests/test_calib.py
# enough Adam steps that each window is drawn several times in an order the carried generator
# decides: a resume that did not restore the generator's state draws other windows
STEPS = 12
RUN_TIMEOUT_S = 240
POLL_S = 0.002

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# the tiny llama and its calibration text: tests/test_calib.py's fixtures
from test_calib import src, text_file  # noqa: E402,F401


@pytest.fixture(scope="module")
def lrq_file(src, tmp_path_factory):
    """2-bit, every layer twice: replicas, the serial-init candidates, all of the fit's paths."""
    out = tmp_path_factory.mktemp("resume-lrq") / "all.gguf"
    convert(src, out, ConvertOptions(bits=2, group_size=32, plan="all", progress=False))
    return out


def _calib_args(src, text_file, *extra) -> list[str]:
    return [str(a) for a in ("--source", src, "--text", text_file, "--tokens", N_WIN * WINDOW,
                             "--window", WINDOW, "--steps", STEPS, "--threads", 1, *extra)]


def _calib_opts(text_file, **kw) -> CalibrateOptions:
    return CalibrateOptions(text=str(text_file), n_tokens=N_WIN * WINDOW, window=WINDOW, steps=STEPS,
                            progress=False, **kw)


def _cmd(module: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *argv]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _kill_after_first_layer(cmd: list[str], resume_dir: Path) -> None:
    """Start ``cmd``, SIGKILL it (its whole session) once the first layer file is in
    ``resume_dir``; fail if the run ended on its own first."""
    first = resume_dir / LAYER_FILE.format(0)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.monotonic()
    while proc.poll() is None and not first.exists():
        if time.monotonic() - t0 > RUN_TIMEOUT_S:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{cmd[2]}: no layer file after {RUN_TIMEOUT_S} s")
        time.sleep(POLL_S)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (exit {proc.returncode}): {err[-2000:]}"


def _finished(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith("layer-"))


# ---- lrq-calibrate ----------------------------------------------------------------------------

def test_calibrate_killed_then_resumed_is_byte_identical(src, text_file, lrq_file, tmp_path):
    ref = tmp_path / "ref.gguf"
    calibrate(lrq_file, ref, src, _calib_opts(text_file))                   # uninterrupted, no resume
    d, out = tmp_path / "state", tmp_path / "out.gguf"
    cmd = _cmd("lrq.cli.calibrate", [str(lrq_file), str(out), *_calib_args(src, text_file, "--resume", d)])
    _kill_after_first_layer(cmd, d)
    assert not out.exists()                                   # never a half-written output
    left = _finished(d)
    assert LAYER_FILE.format(0) in left and LAYER_FILE.format(2) not in left, left   # killed mid-run
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fitted by an earlier run" in r.stderr + r.stdout
    assert out.read_bytes() == ref.read_bytes()
    assert _finished(d) == [LAYER_FILE.format(i) for i in range(3)]


@pytest.fixture(scope="module")
def finished_state(src, text_file, lrq_file, tmp_path_factory):
    """A complete resume directory and the uninterrupted output it belongs to."""
    d = tmp_path_factory.mktemp("resume-state")
    out = d / "out.gguf"
    calibrate(lrq_file, out, src, _calib_opts(text_file, resume=str(d / "state")))
    return d / "state", out


def _calib_main(argv) -> int:
    return calibrate_cli.main([str(a) for a in argv] + ["-q"])


def test_calibrate_resume_refuses_other_options_and_inputs(src, text_file, lrq_file, finished_state,
                                                           tmp_path, capsys):
    d, ref = finished_state
    base = _calib_args(src, text_file, "--resume", d)
    out = tmp_path / "o.gguf"
    # an option that changes the fit is refused by name
    assert _calib_main([lrq_file, out, *base, "--steps", STEPS + 1]) == 1
    err = capsys.readouterr().err
    assert f"--steps {STEPS} -> {STEPS + 1}" in err and str(d) in err
    assert _calib_main([lrq_file, out, *base, "--seed", 3]) == 1
    assert "--seed 0 -> 3" in capsys.readouterr().err
    # another input file: a conversion of the same source with other initial replica parameters
    other = tmp_path / "other.gguf"
    convert(src, other, ConvertOptions(bits=2, group_size=32, plan="all", grid_offset=0.5, progress=False))
    assert _calib_main([other, out, *base]) == 1
    err = capsys.readouterr().err
    assert "IN" in err and str(other) in err and "content differs" in err
    assert not out.exists()
    # the same content under another name and mtime is the same input: accepted (sha256)
    copy = tmp_path / "copy.gguf"
    shutil.copy(lrq_file, copy)
    os.utime(copy, (1, 1))
    assert _calib_main([copy, out, *base]) == 0
    assert out.read_bytes() == ref.read_bytes()


def test_calibrate_damaged_layer_file_is_refused_by_name(src, text_file, lrq_file, finished_state,
                                                         tmp_path, capsys):
    d0, _ = finished_state
    d = tmp_path / "state"
    shutil.copytree(d0, d)
    layer = d / LAYER_FILE.format(1)
    raw = bytearray(layer.read_bytes())
    raw[len(raw) // 2] ^= 0x40                   # one flipped bit inside the stored tensors
    layer.write_bytes(bytes(raw))
    out = tmp_path / "o.gguf"
    assert _calib_main([lrq_file, out, *_calib_args(src, text_file, "--resume", d)]) == 1
    err = capsys.readouterr().err
    assert str(layer) in err and "damaged" in err
    assert not out.exists()
    layer.write_bytes(bytes(raw[:100]))          # cut short
    assert _calib_main([lrq_file, out, *_calib_args(src, text_file, "--resume", d)]) == 1
    assert str(layer) in capsys.readouterr().err
    (d / MANIFEST).write_text("{")               # the manifest too
    assert _calib_main([lrq_file, out, *_calib_args(src, text_file, "--resume", d)]) == 1
    assert MANIFEST in capsys.readouterr().err


def test_adapter_resume_is_byte_identical(src, text_file, tmp_path):
    """--adapter takes the same path: an adapter fitted with layers 1.. lost (as a kill after
    layer 0 leaves it) is the uninterrupted run's adapter."""
    from lrq import tools
    base = tmp_path / "q4_0.gguf"
    tools.run("llama-quantize", [str(src), str(base), "Q4_0"])
    ref, out, d = tmp_path / "ref.adapter.gguf", tmp_path / "a.adapter.gguf", tmp_path / "state"
    calibrate(base, ref, src, _calib_opts(text_file), plan="last-1", adapter=True)
    calibrate(base, out, src, _calib_opts(text_file, resume=str(d)), plan="last-1", adapter=True)
    for i in (1, 2):
        (d / LAYER_FILE.format(i)).unlink()
    out.unlink()
    s = calibrate(base, out, src, _calib_opts(text_file, resume=str(d)), plan="last-1", adapter=True)
    assert s.resumed_layers == 1
    assert out.read_bytes() == ref.read_bytes()


# ---- lrq-convert --gptq -----------------------------------------------------------------------

def _convert_args(text_file, *extra, quiet: bool = True) -> list[str]:
    return [str(a) for a in ("--bits", 2, "--group-size", 32, "--gptq", "--calib-text", text_file,
                             "--calib-tokens", N_WIN * WINDOW, "--calib-window", WINDOW, *extra)
            ] + (["-q"] if quiet else [])


def test_convert_gptq_killed_then_resumed_is_byte_identical(src, text_file, tmp_path, capsys):
    ref = tmp_path / "ref.gguf"
    convert(src, ref, ConvertOptions(bits=2, group_size=32, gptq=True, calib_text=str(text_file),
                                     calib_tokens=N_WIN * WINDOW, calib_window=WINDOW, progress=False))
    d, out = tmp_path / "state", tmp_path / "out.gguf"
    cmd = _cmd("lrq.cli.convert", [str(src), str(out), *_convert_args(text_file, "--resume", d, quiet=False)])
    _kill_after_first_layer(cmd, d)
    assert not out.exists()
    assert LAYER_FILE.format(2) not in _finished(d)
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "quantized by an earlier run" in r.stderr
    assert out.read_bytes() == ref.read_bytes()
    # a resume with another quantizer option is refused by name; the plan is free (codes only)
    assert convert_cli.main([str(src), str(tmp_path / "x.gguf"),
                             *_convert_args(text_file, "--resume", d, "--gptq-damp", 0.2)]) == 1
    assert "--gptq-damp 0.1 -> 0.2" in capsys.readouterr().err
    assert convert_cli.main([str(src), str(tmp_path / "p.gguf"),
                             *_convert_args(text_file, "--resume", d, "--plan", "all")]) == 0
    convert(src, tmp_path / "p_ref.gguf", ConvertOptions(
        bits=2, group_size=32, gptq=True, calib_text=str(text_file), calib_tokens=N_WIN * WINDOW,
        calib_window=WINDOW, plan="all", progress=False))
    assert (tmp_path / "p.gguf").read_bytes() == (tmp_path / "p_ref.gguf").read_bytes()


def test_convert_resume_needs_a_calibrated_conversion(src, tmp_path, capsys):
    assert convert_cli.main([str(src), str(tmp_path / "x.gguf"), "--resume", str(tmp_path / "d"), "-q"]) == 1
    assert "--resume keeps the finished layers of a conversion with calibration" in capsys.readouterr().err
