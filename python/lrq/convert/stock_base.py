"""A stock-typed base (format v2): llama-quantize makes the shared weights, lrq adds replicas.

    lrq-convert model.gguf out.gguf --base-type IQ2_XS --calib sotu-calib --plan last-4

Steps: the source's float32 reference (``llama-quantize F32``; for a Hugging Face directory,
``convert_hf_to_gguf.py --outtype f32``), an importance matrix when one is given or a calibration
text is named (``llama-imatrix``; IQ2_XXS / IQ2_XS / IQ1_* cannot be made without one), the stock
quantization (``llama-quantize [--imatrix] REF Q TYPE``, with llama-quantize's own per-tensor type
choices), and then the LRQ file: every tensor of the stock file byte for byte, the schedule and
``lrq.format_version`` 2.  No replica tensor is written: every replica starts as an exact copy
of replica 0 (gain 1, bias 0, no clip) for ``lrq-calibrate`` to move.

The intermediate files of a GGUF source go to lrq's evaluation cache (``lrq.eval.stock``, the
same files ``lrq-eval --stock`` compares against, so a replicated file and its unreplicated stock
baseline share their codes exactly); ``work`` puts them elsewhere.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..constants import FORMAT_VERSION, Keys, is_aux_tensor, is_block_linear, lrq_arch, lrq_bits
from ..bpw_count import count_bpw
from ..gguf_hparams import GGUFFileError, numpy_shape, open_reader, read_kv
from ..gguf_write import GGUFStreamWriter, WriterError
from .arch import ConvertError, converter_for
from .hf import hf_config, run_convert_hf
from .pipeline import ConvertSummary, _make_plan, write_schedule


def stock_base_file(src: Path, base_type: str, *, imatrix: str | None, calib_text: str | None,
                    work: Path | None, log) -> tuple[Path, Path | None]:
    """(the stock-quantized GGUF of ``src``, the imatrix used or None); ConvertError on failure."""
    from ..eval.stock import IMATRIX_REQUIRED, StockError, make_imatrix, make_stock, reference_f32
    btype = base_type.upper()
    if btype in IMATRIX_REQUIRED and not (imatrix or calib_text):
        raise ConvertError(f"--base-type {btype} needs an importance matrix: give --imatrix FILE "
                           f"or a calibration text (--calib NAME|FILE)")
    try:
        log(f"float32 reference of {src.name} (llama-quantize F32) ...")
        ref = reference_f32(src, work)
        im = None
        if imatrix:
            im = Path(imatrix)
            if not im.is_file():
                raise ConvertError(f"--imatrix {im}: no such file")
        elif calib_text:
            log(f"importance matrix on {calib_text} (llama-imatrix) ...")
            im = make_imatrix(ref, calib_text, work=work)
        log(f"llama-quantize {btype}{' with ' + im.name if im else ''} ...")
        return make_stock(ref, btype, imatrix=im, work=work), im
    except StockError as e:
        raise ConvertError(str(e)) from None


def convert_stock_base(src: Path, out: Path, plan_spec: str, base_type: str, *,
                       imatrix: str | None, calib_text: str | None, work: Path | None,
                       progress: bool, log, source_name: str = "") -> ConvertSummary:
    """``src`` (a GGUF, or an HF directory) -> the v2 LRQ file ``out`` with a stock-typed base."""
    t0 = time.monotonic()
    if src.is_dir():
        hf_config(src)
        with tempfile.TemporaryDirectory(prefix=".lrq-convert-", dir=out.parent) as tmp:
            log(f"converting {src} to an F32 GGUF with convert_hf_to_gguf.py ...")
            f32 = run_convert_hf(src, Path(tmp) / "source-f32.gguf")
            q, im = stock_base_file(f32, base_type, imatrix=imatrix, calib_text=calib_text,
                                    work=Path(tmp), log=log)
            return _wrap(q, im, out, plan_spec, base_type, progress, t0, source_name or src.name)
    q, im = stock_base_file(src, base_type, imatrix=imatrix, calib_text=calib_text, work=work, log=log)
    return _wrap(q, im, out, plan_spec, base_type, progress, t0, source_name or src.name)


def _wrap(q: Path, imatrix: Path | None, out: Path, plan_spec: str, base_type: str,
          progress: bool, t0: float, source_name: str) -> ConvertSummary:
    """The stock file ``q`` with lrq's keys and schedule, every tensor copied byte for byte."""
    try:
        reader = open_reader(q)
    except GGUFFileError as e:
        raise ConvertError(str(e)) from None
    kv = read_kv(reader)
    arch = str(kv.get("general.architecture"))
    shapes = {t.name: numpy_shape(t) for t in reader.tensors}
    conv = converter_for(arch, str(q))(kv, shapes, str(q))
    conv.check()
    plan = _make_plan(plan_spec, conv.n_layer)
    linears = [t for t in reader.tensors if is_block_linear(t.name) and len(numpy_shape(t)) == 2]
    if not linears:
        raise ConvertError(f"{q}: no block linear (blk.N.attn_q.weight, ...) to replicate")
    bad = [t.name for t in reader.tensors if lrq_bits(t.tensor_type) is not None or is_aux_tensor(t.name)]
    if bad:
        raise ConvertError(f"{q}: tensor {bad[0]} is an LRQ tensor; a stock base must be a plain GGUF")
    bpw = count_bpw((t.name, numpy_shape(t), int(t.tensor_type), int(t.n_bytes)) for t in reader.tensors)
    try:
        writer = GGUFStreamWriter(out, lrq_arch(conv.arch))
    except WriterError as e:
        raise ConvertError(str(e)) from None
    with writer:
        for key, f in reader.fields.items():
            # general.file_type stays: the stock ftype describes a stock-typed base exactly
            if not key.startswith("GGUF.") and (conv.copy_key(key) or key == "general.file_type"):
                writer.copy_field(f)
        writer.add_uint32(Keys.FORMAT_VERSION, FORMAT_VERSION)
        writer.add_string(Keys.BASE_ARCH, conv.arch)
        writer.add_string(Keys.BASE_TYPE, base_type.upper())
        if imatrix is not None:
            writer.add_string(Keys.BASE_IMATRIX, imatrix.name)
        write_schedule(writer, plan, plan_spec, int(kv.get(f"{conv.arch}.expert_count") or 0))
        writer.add_string(Keys.SOURCE, source_name)
        writer.add_string(Keys.CONVERTER, f"lrq {__version__}")
        writer.add_float32(Keys.BPW_LINEARS, bpw["linears"])
        for t in reader.tensors:
            writer.add_tensor_info(t.name, numpy_shape(t), int(t.tensor_type))
        writer.write_header()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(reader.tensors), unit="tensor", desc="lrq-convert", leave=False)
        try:
            for t in reader.tensors:
                writer.write_tensor(t.name, np.asarray(t.data))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        writer.finish()
    return ConvertSummary(
        output=out, arch=conv.arch, n_layer=conv.n_layer, n_exec=plan.n_exec, n_lrq_tensors=0,
        n_kept_tensors=len(reader.tensors), n_replica_tensors=0, bpw_lrq=bpw["linears"],
        bpw_file=bpw["file"], file_bytes=out.stat().st_size,
        seconds=time.monotonic() - t0, plan=plan.source or plan_spec,
        base_type=base_type.upper())
