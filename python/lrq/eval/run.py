"""Perplexity, KL-divergence and top-1 agreement of GGUF files against an F32 reference,
through the patched llama-perplexity (DATA.md's protocol).

    base = base_logits(ref_f32, "sotu-eval", ctx=512, chunks=40, threads=2)   # once, cached
    row = evaluate_model("q.gguf", base, threads=2)                           # --kl-divergence

The base run (``--kl-divergence-base``) stores the reference's log-probabilities of every scored
token (~25 MB per 512-token chunk for a 49k vocabulary); it is cached under the work dir, keyed by
reference (file and type: lrq-eval --ref-type), text, context and chunks, as an lrq.atomic cache entry (unique temporary name,
fsync, rename, sidecar last: an interrupted run is a miss, never a partial hit).  Every later
run reads the tokens from that file, so every model is scored on exactly the same windows.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import atomic, tools
from .bpw import file_bpw
from .parse import BaseResult, parse_base, parse_kld
from .stock import _stamp, work_dir


class EvalError(RuntimeError):
    """An evaluation could not run; the message names the file and the tool."""


def _run_parsed(args: list, parse, what: str):
    """Run llama-perplexity and parse its summary (patches/0004 makes the tool flush its log
    before exiting, so a successful run always prints it)."""
    proc = tools.run("llama-perplexity", args)
    return parse(proc.stdout + proc.stderr, what)


@dataclass(frozen=True)
class Base:
    """A reference run: its logits file and its own perplexity."""
    ref: Path
    logits: Path
    text: str
    text_file: Path
    ctx: int
    chunks: int
    threads: int | None
    result: BaseResult
    ref_type: str = "F32"      # what the reference is (ref_type_label: "F16", "source:Q4_1", ...)


def ref_type_label(ref_type: str, ref: str | os.PathLike) -> str:
    """How rows and headers name a reference of type ``ref_type`` (lrq.eval.stock.REF_TYPES):
    the type of a copy, or ``source:<type>`` for the source file itself (its block linears'
    most common type)."""
    if ref_type != "source":
        return ref_type
    return f"source:{file_bpw(ref).file_type}"


@dataclass
class Row:
    label: str
    path: str
    kind: str                  # "reference" | "stock" | "lrq"
    file_type: str
    bpw: float
    ppl: float
    ppl_err: float
    kld: float
    kld_err: float
    top1: float                # fraction of tokens whose argmax agrees with the reference
    top1_err: float
    seconds: float = math.nan
    pareto_ppl: bool = False
    pareto_kld: bool = False
    extra: dict = field(default_factory=dict)
    ref_type: str = "F32"      # the reference its PPL base / KLD / top-1 are measured against

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def text_file(text: str | os.PathLike) -> Path:
    """A bundled text name -> its installed path; anything else must be a readable file."""
    from ..assets import ASSETS, AssetError, path as asset_path
    key = os.fspath(text)
    if key in ASSETS:
        if ASSETS[key].kind != "text":
            raise EvalError(f"'{key}' is a bundled model, not a text")
        try:
            return asset_path(key)
        except AssetError as e:
            raise EvalError(str(e)) from None
    p = Path(key)
    if not p.is_file():
        names = ", ".join(k for k, a in ASSETS.items() if a.kind == "text")
        raise EvalError(f"text '{key}' is neither a bundled text ({names}) nor a readable file")
    return p


def _ppl_args(model: Path, tfile: Path, ctx: int, chunks: int, threads: int | None) -> list:
    args = ["-m", model, "-f", tfile, "-c", ctx, "--chunks", chunks]
    if threads:
        args += ["-t", threads]
    return args


def base_logits(ref_f32: str | os.PathLike, text: str | os.PathLike, ctx: int = 512, chunks: int = 40,
                threads: int | None = None, work: str | os.PathLike | None = None,
                ref_type: str = "F32") -> Base:
    """Run the reference once with ``--kl-divergence-base`` (cached) and parse its PPL.
    ``ref_type``: the label of what the reference is (ref_type_label), part of the cache key."""
    ref = Path(ref_f32)
    if not ref.is_file():
        raise EvalError(f"{ref}: no such reference file")
    tfile = text_file(text)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(os.fspath(text)).stem)
    stem = ref.name[:-5] if ref.name.endswith(".gguf") else ref.name
    out = work_dir(work) / f"{stem}.{tag}.c{ctx}.n{chunks}.kld"
    recipe = {"ref": _stamp(ref), "text": _stamp(tfile), "ctx": ctx, "chunks": chunks}
    if ref_type != "F32":
        # entries of the F32 reference were written before the key had this field and stay valid;
        # a reference of another type is another file too (its own name and stamp), so this
        # only makes the key say what the logits are of
        recipe["ref_type"] = ref_type
    saved = atomic.load_entry(out, recipe)
    if saved is not None:
        try:
            return Base(ref, out, os.fspath(text), tfile, ctx, chunks, threads,
                        BaseResult(**saved["result"]), ref_type)
        except (TypeError, KeyError):
            pass                                      # a sidecar without a usable result: remake
    # the temporary name of an earlier version (one fixed name; never a final file)
    out.with_name(out.stem + ".part" + out.suffix).unlink(missing_ok=True)

    def produce(tmp: Path) -> dict:
        res = _run_parsed(_ppl_args(ref, tfile, ctx, chunks, threads) + ["--kl-divergence-base", tmp],
                          parse_base, f"llama-perplexity on {ref}")
        return {"result": asdict(res)}

    try:
        saved = atomic.store_entry(out, recipe, produce)
    except Exception as e:
        raise EvalError(f"reference run on {ref}: {e}") from None
    return Base(ref, out, os.fspath(text), tfile, ctx, chunks, threads, BaseResult(**saved["result"]),
                ref_type)


def reference_row(base: Base, label: str | None = None) -> Row:
    """The reference's own row, labelled "<type> reference" ("F32 reference" by default)."""
    b = file_bpw(base.ref)
    kind = base.ref_type.split(":", 1)[0]
    return Row(label or f"{kind} reference", str(base.ref), "reference", b.file_type, b.bpw,
               base.result.ppl, base.result.ppl_err, 0.0, 0.0, 1.0, 0.0, ref_type=base.ref_type)


def evaluate_model(model: str | os.PathLike, base: Base, label: str | None = None,
                   threads: int | None = None, kind: str | None = None,
                   adapter: str | os.PathLike | None = None, layers: str | None = None) -> Row:
    """One ``--kl-divergence`` run of ``model`` against ``base``; with ``adapter`` / ``layers``
    (FORMAT.md 11 / 7.1) the model is that base with the adapter or layer map applied at load
    time (llama-perplexity's --lrq-adapter / --lrq-layers), its bpw the bound model's."""
    model = Path(model)
    if not model.is_file():
        raise EvalError(f"{model}: no such model file")
    try:
        b = file_bpw(model, adapter=adapter, layers=layers)
    except Exception as e:  # GGUFFileError, LRQFileError: the message names the file
        raise EvalError(str(e)) from None
    load = (["--lrq-adapter", str(adapter)] if adapter is not None else []) + \
        (["--lrq-layers", layers] if layers is not None else [])
    t0 = time.monotonic()
    try:
        r = _run_parsed(_ppl_args(model, base.text_file, base.ctx, base.chunks, threads or base.threads)
                        + load + ["--kl-divergence-base", base.logits, "--kl-divergence"],
                        parse_kld, f"llama-perplexity --kl-divergence on {model}")
    except Exception as e:
        raise EvalError(f"{model}: {e}") from None
    return Row(label or model.name, str(model), kind or b.kind, b.file_type, b.bpw, r.ppl, r.ppl_err,
               r.kld, r.kld_err, r.same_top_p, r.same_top_p_err, time.monotonic() - t0,
               extra={"ppl_base": r.ppl_base, "rms_dp": r.rms_dp, "n_chunks": r.n_chunks},
               ref_type=base.ref_type)
