"""The F32 reference and stock llama.cpp quantizations of it, made once and cached by name.

    ref = reference_f32(assets.path("smollm2-135m"))             # <work>/SmolLM2-...F32.gguf
    ref = reference_model(src, "F16")                              # <work>/<stem>.ref-F16.gguf
    imat = make_imatrix(ref, "sotu-calib")                         # llama-imatrix on calibration text
    q = make_stock(ref, "IQ2_XS", imatrix=imat)                    # llama-quantize ref q IQ2_XS

Every file is a cache entry of lrq.atomic: the tool writes a unique temporary name (the
writer's PID in it), which is fsynced and renamed when the tool succeeded; the JSON sidecar
``<file>.json`` is written last and records the inputs (source path, size, mtime; type;
imatrix) and the file's own size and mtime.  A cached file is reused only when both agree, so an
interrupted run never leaves an entry the cache would take for finished, and concurrent runs
never write the same temporary file.  Temporaries of killed runs are removed by the next one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import atomic, tools
from ..fetch import cache_dir

# Types llama-quantize refuses to make without an importance matrix (quantize.cpp checks
# IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M; IQ2_S / Q2_K at very low bpw are allowed without one).
IMATRIX_REQUIRED = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M")
# The stock types lrq-eval --stock compares against by default (DATA.md's table).
STOCK_DEFAULT = ("Q4_0", "Q3_K_S", "Q2_K", "IQ2_XS", "IQ2_XXS")
_TYPE = re.compile(r"^[A-Z0-9_]+$")
# imatrix chunks of 512 tokens on the calibration text; llama.cpp's own examples use ~100;
# 64 keeps the one-off cost ~2 min for SmolLM2 on 2 cores (see lrq-eval --imatrix-chunks)
IMATRIX_CHUNKS = 64
# What lrq-eval --ref-type takes as the reference: a llama-quantize copy of SRC in one of these
# types (F32 is 4 bytes a weight: 128 GB for a 32B model; F16 / BF16 half that, Q8_0 ~1.06 bytes)
# or "source": SRC itself, as downloaded, no copy at all.
REF_TYPES = ("F32", "F16", "BF16", "Q8_0", "source")


class StockError(RuntimeError):
    """A reference / stock file could not be made; the message names the file and the tool."""


def work_dir(path: str | os.PathLike | None = None) -> Path:
    d = Path(path) if path else cache_dir() / "eval"
    d.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(d)        # left by killed runs, also when every entry is a hit
    return d


def _stamp(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cached(out: Path, recipe: dict) -> bool:
    return atomic.load_entry(out, recipe) is not None


def _make(out: Path, recipe: dict, tool: str, args: list, timeout: float | None = None) -> Path:
    """Run ``tool`` writing to a temporary path (the caller puts the placeholder ``{out}`` in
    args), then commit it as cache entry ``out``."""
    if _cached(out, recipe):
        return out
    # the temporary name of an earlier version (one fixed name; never a final file)
    out.with_name(out.stem + ".part" + out.suffix).unlink(missing_ok=True)

    def produce(tmp: Path) -> None:
        try:
            tools.run(tool, [str(tmp) if a == "{out}" else a for a in args], timeout=timeout)
        except tools.ToolError as e:
            raise StockError(f"making {out}: {e}") from None
        if not tmp.is_file():
            raise StockError(f"making {out}: {tool} exited 0 but wrote nothing")

    atomic.store_entry(out, recipe, produce)
    return out


def _stem(p: Path) -> str:
    s = p.name
    for suf in (".gguf",):
        s = s[: -len(suf)] if s.endswith(suf) else s
    return s


def reference_f32(src: str | os.PathLike, work: str | os.PathLike | None = None) -> Path:
    """``llama-quantize --allow-requantize SRC <work>/<stem>.F32.gguf F32`` (cached)."""
    src = Path(src)
    if not src.is_file():
        raise StockError(f"{src}: no such model file")
    out = work_dir(work) / f"{_stem(src)}.F32.gguf"
    if out.resolve() == src.resolve():
        return out
    return _make(out, {"src": _stamp(src), "type": "F32"}, "llama-quantize",
                 ["--allow-requantize", src, "{out}", "F32"])


def reference_model(src: str | os.PathLike, ref_type: str = "F32",
                    work: str | os.PathLike | None = None) -> Path:
    """The reference of lrq-eval --ref-type (REF_TYPES): ``source`` is ``src`` itself; F32 is
    reference_f32; the others ``llama-quantize --allow-requantize SRC <work>/<stem>.ref-<TYPE>.gguf
    TYPE`` (cached like the F32 copy; the name keeps them apart from make_stock's files of the
    same type, which are quantized from a reference, not from SRC)."""
    src = Path(src)
    if ref_type not in REF_TYPES:
        raise StockError(f"reference type '{ref_type}' is not one of {', '.join(REF_TYPES)}")
    if not src.is_file():
        raise StockError(f"{src}: no such model file")
    if ref_type == "source":
        return src
    if ref_type == "F32":
        return reference_f32(src, work)
    out = work_dir(work) / f"{_stem(src)}.ref-{ref_type}.gguf"
    if out.resolve() == src.resolve():
        return out
    return _make(out, {"src": _stamp(src), "type": ref_type}, "llama-quantize",
                 ["--allow-requantize", src, "{out}", ref_type])


def make_imatrix(ref_f32: str | os.PathLike, text: str | os.PathLike, *, chunks: int = IMATRIX_CHUNKS,
                 ctx: int = 512, threads: int | None = None,
                 work: str | os.PathLike | None = None) -> Path:
    """``llama-imatrix`` of the reference on a text (a bundled name or a file), cached."""
    from ..assets import ASSETS, path as asset_path
    ref = Path(ref_f32)
    text_name = os.fspath(text)
    tfile = asset_path(text_name) if text_name in ASSETS else Path(text_name)
    if not tfile.is_file():
        raise StockError(f"imatrix text '{text_name}' is neither a bundled text nor a file")
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(text_name).stem)
    out = work_dir(work) / f"{_stem(ref)}.imatrix-{tag}-c{ctx}-n{chunks}.gguf"
    args = ["-m", ref, "-f", tfile, "-o", "{out}", "-c", ctx, "--chunks", chunks, "--no-ppl"]
    if threads:
        args += ["-t", threads]
    return _make(out, {"ref": _stamp(ref), "text": _stamp(tfile), "ctx": ctx, "chunks": chunks},
                 "llama-imatrix", args)


def make_stock(ref_f32: str | os.PathLike, qtype: str, imatrix: str | os.PathLike | None = None,
               work: str | os.PathLike | None = None, threads: int | None = None,
               requantize: bool = False, tag: str = "") -> Path:
    """``llama-quantize [--imatrix I] REF <work>/<stem>[.<tag>].<TYPE>[.imat].gguf TYPE`` (cached
    by name).  ``requantize``: REF may hold quantized tensors (a Q8_0 reference, a reference that
    is the source file itself): llama-quantize's --allow-requantize.  ``tag`` keeps the files of
    such a reference apart from those quantized from the F32 copy of the same source.

    Types in IMATRIX_REQUIRED need ``imatrix``; StockError otherwise."""
    ref = Path(ref_f32)
    if not ref.is_file():
        raise StockError(f"{ref}: no such reference file")
    qtype = qtype.upper()
    if not _TYPE.match(qtype):
        raise StockError(f"'{qtype}' is not a llama-quantize type name (e.g. Q4_0, Q2_K, IQ2_XS)")
    if qtype in IMATRIX_REQUIRED and imatrix is None:
        raise StockError(f"{qtype} needs an importance matrix (make_imatrix / lrq-eval --imatrix-text)")
    base = _stem(ref)
    base = base[:-4] if base.endswith(".F32") else base
    name = f"{base}{'.' + tag if tag else ''}.{qtype}" + (".imat" if imatrix is not None else "") + ".gguf"
    out = work_dir(work) / name
    recipe = {"ref": _stamp(ref), "type": qtype}
    args: list = []
    if imatrix is not None:
        im = Path(imatrix)
        if not im.is_file():
            raise StockError(f"{im}: no such imatrix file")
        recipe["imatrix"] = _stamp(im)
        args += ["--imatrix", im]
    if requantize:
        args += ["--allow-requantize"]
    args += [ref, "{out}", qtype]
    if threads:
        args += [threads]
    return _make(out, recipe, "llama-quantize", args)
