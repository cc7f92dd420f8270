"""GGUF / Hugging Face model -> LRQ GGUF, streamed tensor by tensor, written atomically.

Order of work: options and output path are checked, the source's header is read, the
architecture, its tensors and the plan are validated — all before a single weight is touched.
Then every output tensor is declared (so the header, including lrq.bpw.lrq, can be written
first) and the data is produced one source tensor at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .. import __version__
from ..constants import (BITS_CHOICES, FORMAT_VERSION, GROUP_SIZES, MODES, TERNARY_BITS, Keys,
                         layer_of, lrq_arch, lrq_type, min_name,
                         replica_param_name, scale_name, sub_name)
from ..bpw_count import count_bpw
from ..gguf_hparams import GGUFFileError, dequantize_tensor, numpy_shape, open_reader, read_kv
from ..gguf_write import GGUFStreamWriter, WriterError, check_output_path, tensor_nbytes
from ..plan import Plan, PlanError, check_expert_entries, make_plan
from ..quant import QuantError, n_groups, quantize
from .arch import ArchConverter, ConvertError, converter_for, converter_for_hf
from .hf import hf_config, hf_n_layer, run_convert_hf
from .mix import MixError, parse_mix
from .replicas import initial_param_names, initial_params

CALIB_STREAMS = ("quantized", "float")

U32 = gguf.GGUFValueType.UINT32
F32V = gguf.GGUFValueType.FLOAT32
F16 = gguf.GGMLQuantizationType.F16
I8 = gguf.GGMLQuantizationType.I8


@dataclass
class ConvertOptions:
    bits: int = 2
    mode: str = "asym"                 # asym | sym | ternary
    group_size: int = 64
    # minmax | mse | act-mse (needs calib_text); None: mse with gptq (with refit: KLD 1.60
    # against minmax's 2.07; act-mse 1.63), minmax otherwise
    scale_search: str | None = None
    rounding: str = "nearest"          # nearest | stochastic
    noise: float = 0.0                 # std (code units) of Gaussian noise added before rounding
    grid_offset: float = 0.0           # replica r >= 1 initial grid offset magnitude (code units)
    scale_delta: float = 0.0           # replica r >= 1 initial scale multiplier deviation
    keep: str | None = None            # regex: matching tensors keep their source type
    mix: str | None = None             # mixed precision: a preset or PATTERN=BITS rules (mix.py)
    plan: str = "none"                 # preset or plan file
    seed: int = 0
    progress: bool = True
    # calibration-aware base quantizers (lrq.calib.gptq); both need a calibration text
    gptq: bool = False                 # GPTQ error-compensating rounding (Hessian of the inputs)
    calib_text: str | None = None      # bundled text name or a file
    calib_tokens: int = 4096
    calib_window: int = 512
    # Defaults below measured on SmolLM2 (2-bit asym g64, 4096 tokens of sotu-calib; KLD on 10
    # chunks of sotu-eval, +- 0.03).
    # GPTQ's dampening, a fraction of mean(diag(H)): without refit 0.01 (the paper's) 4.33, 0.1
    # 3.10; with refit 0.05 1.62, 0.1 1.60, 0.3 1.75, 1.0 2.14
    gptq_damp: float = 0.1
    # where the calibrated quantizers' statistics come from: "quantized" = the stream of the
    # model being quantized, layer by layer and sub-layer by sub-layer (sequential GPTQ), "float"
    # = the source's.  None: quantized for GPTQ (KLD 1.60 against the float stream's 2.83; the
    # old float-stream default, minmax and damping 0.01, 10.2: worse than round-to-nearest's
    # 9.37), float for act-mse (2.30 against 2.53 with refit, 5.58 against 7.29 without)
    calib_stream: str | None = None
    # weighted least-squares refit of each group's (d, m) on its codes (lrq.calib.gptq).  None:
    # on for the calibrated quantizers (GPTQ 1.60 against 3.10 without; act-mse 2.30 against
    # 5.58), off for plain round-to-nearest, whose codes stay those of FORMAT.md's reference
    # quantizer (refit with uniform weights there: MSE scales 7.78 against 8.93)
    refit: bool | None = None
    # a stock-typed base (format v2, stock_base.py): llama-quantize makes the shared weights
    base_type: str | None = None       # e.g. IQ2_XS, Q2_K, Q4_K; None = lrq's own LRQ codes
    imatrix: str | None = None         # importance matrix for llama-quantize (else from calib_text)
    work: str | None = None            # directory of the F32 / imatrix / stock / rotated intermediates
    # QuaRot-style rotation of the residual stream before quantization (lrq.rotate, seed = seed):
    # the rotated F32 source is kept (in work, else beside the output) because lrq-calibrate and
    # lrq-eval need it as the full-precision reference of the file
    rotate: bool = False
    # the two-level 2-bit layout (format v4, docs/two_level.md): 0 = off, else its sub-block size
    # (16 or 32); super-blocks of group_size.  Needs 2 bits, asym; importance from --scale-search
    # act-mse's statistics, GPTQ with --gptq.  With --mix the tensors the mix gives 2 bits take
    # it and the wider ones single-level LRQ3 / LRQ4 groups of the same group_size (the file
    # has one group size, FORMAT.md section 2)
    two_level: int = 0
    # a directory keeping each finished layer's quantized tensors of a calibrated conversion
    # (--gptq, act-mse), so that a killed conversion restarts at its first unfinished layer
    # (lrq.resume); the output is byte-identical to an uninterrupted run's
    resume: str | None = None

    def __post_init__(self):
        if self.scale_search is None:
            # with --mix the wider tensors of a two-level file are single-level groups, for which
            # GPTQ's default search is mse; the two-level tensors ignore it (their own search)
            self.scale_search = "mse" if self.gptq and (not self.two_level or self.mix) else "minmax"
        if self.calib_stream is None:
            self.calib_stream = "quantized" if self.gptq else "float"

    def bits_for(self, name: str) -> int:
        """Code bits of block linear ``name``: its --mix rule's, else --bits."""
        return self._mix.bits_for(name, self.bits)

    def is_two_level(self, name: str) -> bool:
        """Block linear ``name`` takes the two-level layout: --layout two-level and 2 bits for it."""
        return bool(self.two_level) and self.bits_for(name) == 2

    @functools.cached_property
    def _mix(self):
        # parsed once per options object (bits_for is asked for every tensor); a bad spec raises
        # MixError here, and validate() turns it into a ConvertError first
        return parse_mix(self.mix)

    @property
    def needs_calibration(self) -> bool:
        return self.gptq or self.scale_search == "act-mse"

    @property
    def refits(self) -> bool:
        return self.needs_calibration if self.refit is None else self.refit

    def validate(self) -> None:
        if self.base_type is not None:
            self._validate_stock_base()
        if self.mode not in MODES:
            raise ConvertError(f"--mode: '{self.mode}' is not one of {', '.join(MODES)}")
        if self.bits not in BITS_CHOICES:
            raise ConvertError(f"--bits: {self.bits} is not one of {', '.join(map(str, BITS_CHOICES))}")
        if self.mode == "ternary" and self.bits != TERNARY_BITS:
            raise ConvertError(f"--ternary stores codes with {TERNARY_BITS} bits; --bits {self.bits} "
                               f"contradicts it")
        try:
            mix = self._mix
        except MixError as e:
            raise ConvertError(str(e)) from None
        if mix.rules and self.mode == "ternary":
            raise ConvertError(f"--mix {self.mix}: ternary codes have one width; use --asym or --sym")
        if self.two_level:
            from ..quant_two_level import SUB_SIZES
            if self.base_type is not None:
                raise ConvertError(f"--layout two-level is a layout of LRQ codes; --base-type {self.base_type} "
                                   f"quantizes with llama-quantize")
            if self.two_level not in SUB_SIZES:
                raise ConvertError(f"--layout two-level:{self.two_level}: the sub-block size must be one of "
                                   f"{', '.join(map(str, SUB_SIZES))}")
            if self.bits != 2 or self.mode != "asym":
                raise ConvertError("--layout two-level holds 2-bit asym codes: it needs --bits 2 and --asym "
                                   "(--mix gives wider tensors single-level codes)")
            if self.refit or self.rounding != "nearest" or self.noise:
                raise ConvertError("--layout two-level fits its own sub-block scales and mins: --refit, "
                                   "--rounding stochastic and --noise cannot be combined with it")
            if self.scale_search == "mse" and not mix.rules:
                raise ConvertError("--layout two-level searches its own scales: --scale-search mse does "
                                   "not apply (act-mse: importance from the calibration text)")
        if self.group_size not in GROUP_SIZES:
            raise ConvertError(f"--group-size: {self.group_size} is not one of "
                               f"{', '.join(map(str, GROUP_SIZES))}")
        if self.scale_search not in ("minmax", "mse", "act-mse"):
            raise ConvertError(f"--scale-search: '{self.scale_search}' is not minmax, mse or act-mse")
        if self.needs_calibration:
            what = "--gptq" if self.gptq else "--scale-search act-mse"
            if not self.calib_text:
                raise ConvertError(f"{what} needs a calibration text (--calib-text NAME|FILE)")
            if self.rounding != "nearest" or self.noise:
                raise ConvertError(f"{what} decides its own rounding: --rounding stochastic and "
                                   f"--noise cannot be combined with it")
            if self.calib_window < 4 or self.calib_tokens < self.calib_window:
                raise ConvertError(f"--calib-tokens {self.calib_tokens} must be at least one "
                                   f"--calib-window ({self.calib_window}, >= 4)")
            if not (np.isfinite(self.gptq_damp) and self.gptq_damp > 0):
                raise ConvertError(f"--gptq-damp must be > 0, got {self.gptq_damp}")
        if self.resume is not None and not self.needs_calibration:
            raise ConvertError("--resume keeps the finished layers of a conversion with calibration "
                               "statistics (--gptq, --scale-search act-mse); this one quantizes every "
                               "tensor on its own in one pass and has nothing to resume")
        if self.refit and (self.rounding != "nearest" or self.noise):   # explicit --refit
            raise ConvertError("--refit re-rounds to the nearest codes of the refitted parameters: "
                               "--rounding stochastic and --noise cannot be combined with it")
        if self.calib_stream not in CALIB_STREAMS:
            raise ConvertError(f"--calib-stream: '{self.calib_stream}' is not one of "
                               f"{', '.join(CALIB_STREAMS)}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ConvertError(f"--rounding: '{self.rounding}' is not nearest or stochastic")
        for opt, v in (("--noise", self.noise), ("--grid-offset", self.grid_offset),
                       ("--scale-delta", self.scale_delta)):
            if not np.isfinite(v) or v < 0:
                raise ConvertError(f"{opt}: must be a finite value >= 0, got {v}")
        if not (0 <= self.seed < 1 << 32):
            raise ConvertError(f"--seed: must be in 0..2^32-1, got {self.seed}")
        if self.rotate and self.base_type is not None:
            raise ConvertError(f"--rotate applies to LRQ codes; --base-type {self.base_type} quantizes "
                               f"the source as llama-quantize has it (rotate it first with "
                               f"lrq.rotate.rotate_model and pass the rotated file)")
        if self.imatrix is not None and self.base_type is None:
            raise ConvertError("--imatrix is for llama-quantize: it needs --base-type TYPE")
        if self.keep is not None:
            try:
                re.compile(self.keep)
            except re.error as e:
                raise ConvertError(f"--keep: '{self.keep}' is not a valid regular expression ({e})") from None


    def _validate_stock_base(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.base_type):
            raise ConvertError(f"--base-type: '{self.base_type}' is not a llama-quantize type name "
                               f"(e.g. IQ2_XS, Q2_K, Q4_K)")
        if self.base_type.upper().startswith("LRQ"):
            raise ConvertError(f"--base-type {self.base_type}: LRQ codes are lrq's default; "
                               f"leave --base-type out and use --bits")
        lrq_only = [opt for opt, on in (
            ("--gptq", self.gptq),
            ("--scale-search", self.scale_search != ("mse" if self.gptq else "minmax")),
            ("--rounding", self.rounding != "nearest"), ("--noise", self.noise != 0),
            ("--grid-offset", self.grid_offset != 0), ("--scale-delta", self.scale_delta != 0),
            ("--keep", self.keep is not None), ("--refit", bool(self.refit)),
            ("--mix", bool(self.mix))) if on]
        if lrq_only:
            raise ConvertError(f"--base-type {self.base_type}: {', '.join(lrq_only)} only apply "
                               f"to LRQ codes (llama-quantize makes a stock base)")


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    type_id: int
    nbytes: int = 0


@dataclass
class SourceTensorPlan:
    """What one source tensor becomes."""
    source: str
    lrq: bool
    outputs: list[OutTensor] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)      # r >= 1 with initial tensors


@dataclass
class ConvertSummary:
    output: Path
    arch: str
    n_layer: int
    n_exec: int
    n_lrq_tensors: int
    n_kept_tensors: int
    n_replica_tensors: int
    bpw_lrq: float
    bpw_file: float
    file_bytes: int
    seconds: float
    plan: str
    base_type: str | None = None
    rotated_source: Path | None = None    # --rotate: the rotated F32 source the file was made from

    def lines(self) -> list[str]:
        if self.base_type:
            return [
                f"wrote {self.output} ({self.file_bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s",
                f"  arch lrq-{self.arch}: {self.n_layer} layers, {self.n_exec} executions (plan {self.plan})",
                f"  stock-typed base {self.base_type} (format v2): {self.n_kept_tensors} tensors "
                f"copied from llama-quantize's file, replicas start as copies of replica 0",
                f"  bpw: {self.bpw_lrq:.3f} (block linears incl. parameters), {self.bpw_file:.3f} (whole file)",
            ]
        return [
            f"wrote {self.output} ({self.file_bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s",
            f"  arch lrq-{self.arch}: {self.n_layer} layers, {self.n_exec} executions (plan {self.plan})",
            f"  tensors: {self.n_lrq_tensors} LRQ, {self.n_kept_tensors} kept, "
            f"{self.n_replica_tensors} replica parameter tensors",
            f"  bpw: {self.bpw_lrq:.3f} (LRQ weights incl. parameters), {self.bpw_file:.3f} (whole file)",
        ] + ([f"  rotated residual stream; full-precision reference: {self.rotated_source}"]
             if self.rotated_source else [])


def write_schedule(writer: GGUFStreamWriter, plan: Plan, spec: str, n_expert: int | None = None) -> None:
    """The four lrq.schedule.* arrays and lrq.plan (FORMAT.md section 7); a plan with expert
    entries also the lrq.moe.* arrays (format v4, docs/moe.md), checked against n_expert."""
    if plan.experts:
        try:
            check_expert_entries(plan.experts, plan.n_layer, n_expert or 0, f"plan {plan.source or spec}")
        except PlanError as e:
            raise ConvertError(str(e)) from None
        for k, v in plan.expert_gguf_arrays().items():
            writer.add_array(k, v, F32V if k == Keys.MOE_WEIGHT else U32)
    arrays = plan.to_gguf_arrays()
    for k in (Keys.SCHEDULE_LAYER, Keys.SCHEDULE_REPLICA, Keys.SCHEDULE_GROUP):
        writer.add_array(k, arrays[k], U32)
    writer.add_array(Keys.SCHEDULE_WEIGHT, arrays[Keys.SCHEDULE_WEIGHT], F32V)
    writer.add_string(Keys.PLAN, plan.source or spec)


def tensor_seed(seed: int, name: str) -> list[int]:
    """Per-tensor RNG seed: stochastic rounding / noise are reproducible and independent of order."""
    return [seed, zlib.crc32(name.encode("utf-8"))]


def _layout(conv: ArchConverter, reader, plan: Plan, opts: ConvertOptions,
            keep: re.Pattern | None) -> list[SourceTensorPlan]:
    rep_params = initial_param_names(opts.scale_delta, opts.grid_offset)
    out = []
    for t in reader.tensors:
        shape = numpy_shape(t)
        is_lrq = conv.is_lrq_candidate(t.name, shape) and not (keep and keep.search(t.name))
        sp = SourceTensorPlan(t.name, is_lrq)
        if not is_lrq:
            sp.outputs.append(OutTensor(t.name, shape, int(t.tensor_type)))
            out.append(sp)
            continue
        n_out, n_in = shape
        sp.outputs.append(OutTensor(t.name, shape, int(lrq_type(opts.bits_for(t.name)))))
        ng = n_groups(n_in, opts.group_size)
        sp.outputs.append(OutTensor(scale_name(t.name), (n_out, ng), int(F16)))
        if opts.mode == "asym":
            sp.outputs.append(OutTensor(min_name(t.name), (n_out, ng), int(F16)))
        if opts.is_two_level(t.name):
            sp.outputs.append(OutTensor(sub_name(t.name), (n_out, n_in // opts.two_level), int(I8)))
        if rep_params:
            sp.replicas = [r for r in plan.replicas(layer_of(t.name)) if r >= 1]
            for r in sp.replicas:
                for p in rep_params:
                    sp.outputs.append(OutTensor(replica_param_name(t.name, r, p), (n_out, 1), int(F16)))
        out.append(sp)
    return out


def _open_gguf(path: Path):
    try:
        return open_reader(path)
    except GGUFFileError as e:
        raise ConvertError(str(e)) from None


def convert(src: str | Path, out: str | Path, opts: ConvertOptions,
            log: Callable[[str], None] = lambda s: None) -> ConvertSummary:
    """Convert ``src`` (GGUF or HF directory) to the LRQ GGUF ``out``.  ConvertError on bad input;
    nothing is left at ``out`` (or next to it) unless the conversion succeeds."""
    t0 = time.monotonic()
    opts.validate()
    src, out = Path(src), Path(out)
    try:
        out = check_output_path(out)
    except WriterError as e:
        raise ConvertError(str(e)) from None
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    if src.is_file() and out.exists() and src.resolve() == out.resolve():
        raise ConvertError(f"{out}: the output would overwrite the source")
    if opts.base_type is not None:
        from .stock_base import convert_stock_base
        return convert_stock_base(src, out, opts.plan, opts.base_type, imatrix=opts.imatrix,
                                  calib_text=opts.calib_text, work=Path(opts.work) if opts.work else None,
                                  progress=opts.progress, log=log)
    if opts.rotate:
        return _convert_rotated(src, out, opts, t0, log)
    if src.is_dir():
        cfg = hf_config(src)
        conv_cls = converter_for_hf(list(cfg.get("architectures") or []), str(src / "config.json"))
        plan = _make_plan(opts.plan, hf_n_layer(cfg, str(src / "config.json")))
        # the F32 intermediate sits next to the output (it can be large; /tmp may be small)
        with tempfile.TemporaryDirectory(prefix=".lrq-convert-", dir=out.parent) as tmp:
            log(f"converting {src} to an F32 GGUF with convert_hf_to_gguf.py ...")
            f32 = run_convert_hf(src, Path(tmp) / "source-f32.gguf")
            return _convert_gguf(f32, out, opts, t0, log, expect=conv_cls, source_name=src.name)
    return _convert_gguf(src, out, opts, t0, log, source_name=src.name)


def rotated_source_path(src: Path, out: Path, opts: ConvertOptions) -> Path:
    """Where --rotate keeps the rotated F32 source: --work, else the output's directory."""
    return Path(opts.work or out.parent) / f"{src.stem}.rotated-seed{opts.seed}.F32.gguf"


def _convert_rotated(src: Path, out: Path, opts: ConvertOptions, t0: float, log) -> ConvertSummary:
    """Fold the norms and rotate the residual stream of ``src`` (lrq.rotate) into an F32 GGUF that
    is kept, then convert that.  The rotated file is removed again if the conversion fails."""
    from ..rotate import RotateError, rotate_model
    rot = rotated_source_path(src, out, opts)
    if rot.resolve() in (src.resolve(), out.resolve()):        # resolve() needs no file
        raise ConvertError(f"{rot}: the rotated source would overwrite {src if rot.resolve() == src.resolve() else out}")
    if opts.work:
        rot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lrq-convert-", dir=rot.parent) as tmp:
        plain = src
        if src.is_dir():
            log(f"converting {src} to an F32 GGUF with convert_hf_to_gguf.py ...")
            plain = run_convert_hf(src, Path(tmp) / "source-f32.gguf")
        log(f"rotating the residual stream of {src.name} (seed {opts.seed}) -> {rot}")
        try:
            rotate_model(plain, rot, seed=opts.seed, log=log, progress=opts.progress)
        except RotateError as e:
            raise ConvertError(str(e)) from None
    try:
        summary = _convert_gguf(rot, out, opts, t0, log, source_name=rot.name)
    except BaseException:
        rot.unlink(missing_ok=True)
        raise
    log(f"kept the rotated source {rot}: it is this file's full-precision reference "
        f"(lrq-calibrate --source, lrq-eval's F32 reference)")
    return dataclasses.replace(summary, rotated_source=rot)


def _make_plan(spec: str, n_layer: int) -> Plan:
    try:
        return make_plan(spec, n_layer)
    except PlanError as e:
        raise ConvertError(str(e)) from None


def _convert_gguf(src: Path, out: Path, opts: ConvertOptions, t0: float, log,
                  expect: type[ArchConverter] | None = None, source_name: str = "") -> ConvertSummary:
    reader = _open_gguf(src)
    kv = read_kv(reader)
    arch = kv.get("general.architecture")
    if arch is None:
        raise ConvertError(f"{src}: key general.architecture is missing")
    conv_cls = converter_for(str(arch), str(src))
    if expect is not None and conv_cls is not expect:
        raise ConvertError(f"{src}: convert_hf_to_gguf.py wrote architecture '{arch}', expected '{expect.arch}'")
    shapes = {t.name: numpy_shape(t) for t in reader.tensors}
    conv = conv_cls(kv, shapes, str(src))
    conv.check()
    n_layer = conv.n_layer
    plan = _make_plan(opts.plan, n_layer)
    # replica 2k gets scale multiplier 1 - k * scale_delta (see replicas.py): it must stay > 0
    max_rep = max(e.replica for e in plan.executions)
    if opts.scale_delta * (max_rep // 2) >= 1:
        raise ConvertError(f"--scale-delta {opts.scale_delta}: replica {max_rep} would get a scale "
                           f"multiplier <= 0")
    keep = re.compile(opts.keep) if opts.keep else None
    layout = _layout(conv, reader, plan, opts, keep)
    n_lrq_sources = sum(sp.lrq for sp in layout)
    if n_lrq_sources == 0:
        raise ConvertError(f"{src}: no tensor would be quantized (every block linear is kept or has "
                           f"n_in not a multiple of 32)")
    by_name = {t.name: t for t in reader.tensors}
    acts = (_CalibratedQuantizer(src, opts, log, {sp.source for sp in layout if sp.lrq}, by_name)
            if opts.needs_calibration else None)

    try:
        writer = GGUFStreamWriter(out, lrq_arch(conv.arch))
    except WriterError as e:
        raise ConvertError(str(e)) from None
    with writer:
        for key, f in reader.fields.items():
            if not key.startswith("GGUF.") and conv.copy_key(key):
                writer.copy_field(f)
        writer.add_uint32(Keys.FORMAT_VERSION, FORMAT_VERSION)
        writer.add_string(Keys.BASE_ARCH, conv.arch)
        writer.add_string(Keys.QUANT_MODE, opts.mode)
        writer.add_uint32(Keys.GROUP_SIZE, opts.group_size)
        writer.add_uint32(Keys.BITS, opts.bits)
        writer.add_string(Keys.SCALE_SEARCH, opts.scale_search)
        writer.add_string(Keys.ROUNDING, "gptq" if opts.gptq else opts.rounding)
        writer.add_float32(Keys.NOISE, opts.noise)
        writer.add_uint32(Keys.SEED, opts.seed)
        writer.add_float32(Keys.INIT_SCALE_DELTA, opts.scale_delta)
        writer.add_float32(Keys.INIT_GRID_OFFSET, opts.grid_offset)
        write_schedule(writer, plan, opts.plan, int(kv.get(f"{conv.arch}.expert_count") or 0))
        if opts.keep:
            writer.add_string(Keys.KEEP, opts.keep)
        writer.add_string(Keys.SOURCE, source_name or src.name)
        writer.add_string(Keys.CONVERTER, f"lrq {__version__}")

        # sizes are known before any data, so the bpw figures can go in the KV section
        for sp in layout:
            for o in sp.outputs:
                o.nbytes = tensor_nbytes(o.shape, o.type_id)
        bpw = count_bpw((o.name, o.shape, o.type_id, o.nbytes) for sp in layout for o in sp.outputs)
        writer.add_float32(Keys.BPW_LRQ, bpw["lrq"])
        writer.add_float32(Keys.BPW_LINEARS, bpw["linears"])
        for sp in layout:
            for o in sp.outputs:
                writer.add_tensor_info(o.name, o.shape, o.type_id)
        writer.write_header()

        total = sum(int(np.prod(shapes[sp.source])) for sp in layout)
        bar = None
        if opts.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="w", unit_scale=True, desc="lrq-convert", leave=False)
        try:
            for sp in layout:
                t = by_name[sp.source]
                if sp.lrq:
                    _write_lrq(writer, sp, t, opts, acts)
                else:
                    writer.write_tensor(sp.source, np.asarray(t.data))
                if bar is not None:
                    bar.update(int(np.prod(shapes[sp.source])))
        finally:
            if bar is not None:
                bar.close()
        writer.finish()

    return ConvertSummary(
        output=out, arch=conv.arch, n_layer=n_layer, n_exec=plan.n_exec,
        n_lrq_tensors=n_lrq_sources, n_kept_tensors=len(layout) - n_lrq_sources,
        n_replica_tensors=sum(1 for sp in layout for o in sp.outputs if ".lrq_r" in o.name),
        bpw_lrq=bpw["lrq"], bpw_file=bpw["file"], file_bytes=out.stat().st_size,
        seconds=time.monotonic() - t0, plan=plan.source or opts.plan)


def _source_weight(t) -> np.ndarray:
    w = dequantize_tensor(t).astype(np.float32)
    if not np.isfinite(w).all():
        raise ConvertError(f"tensor {t.name}: the source contains NaN or infinite values")
    return w


def _quantize_with_stats(w: np.ndarray, st, opts: ConvertOptions, bits: int):
    """(codes, d, m) of one linear from its input statistics (GPTQ or the weighted search)."""
    from ..calib.gptq import gptq_quantize_codes, weighted_quantize_codes
    if opts.gptq:
        return gptq_quantize_codes(w, st.xtx, bits, opts.group_size, opts.mode,
                                   scale_search=opts.scale_search, importance=st.sq_mean,
                                   damp=opts.gptq_damp, refit=opts.refits)
    return weighted_quantize_codes(w, bits, opts.group_size, opts.mode, st.sq_mean,
                                   refit=opts.refits)


class _CalibratedQuantizer:
    """Block linears quantized from calibration statistics (lrq.calib.activations).

    Float stream: every tensor from the source's statistics, in any order.  Quantized stream: the
    first tensor asked of a layer quantizes the whole layer (and any layer before it not done
    yet) in sub-layer order on the quantized model's stream; its other linears wait in
    ``done`` until the writer asks for them (packed codes: a fraction of the float weights).

    With ``opts.resume`` every layer's quantized tensors go to the resume directory once the layer
    is complete; a rerun takes the finished layers from there (on the quantized stream it runs
    them with their dequantized weights, as the uninterrupted run did, to rebuild the stream
    entering the first unfinished layer)."""

    def __init__(self, src: Path, opts: ConvertOptions, log, lrq_names: set[str], by_name: dict):
        from ..calib import CalibError, calibration_windows
        from ..calib.activations import QuantizedStream, SourceActivations
        try:
            windows = calibration_windows(src, opts.calib_text, opts.calib_tokens, opts.calib_window)
        except CalibError as e:
            raise ConvertError(str(e)) from None
        log(f"calibration: {windows.size} tokens of {opts.calib_text} in windows of "
            f"{windows.shape[1]}, statistics of the {opts.calib_stream} model's stream")
        self.opts, self.lrq_names, self.by_name = opts, lrq_names, by_name
        self.done: dict = {}
        self.store, self.n_done = None, 0
        self.pending: dict[int, dict] = {}         # float stream: a layer's tensors until it is complete
        self.loaded: dict[int, dict] = {}          # float stream: finished layers read back
        if opts.resume is not None:
            self.store = _resume_dir(src, opts, windows, log)
            self.n_done = self.store.finished()
            if self.n_done:
                log(f"resuming: layers 0..{self.n_done - 1} were quantized by an earlier run "
                    f"({self.store.dir})")
        # X^T X (n_in^2 float64 per linear) only for GPTQ; act-mse needs E[x^2] per channel
        full = opts.gptq
        if opts.calib_stream == "float":
            self.acts, self.stream = SourceActivations(src, windows, progress=opts.progress,
                                                       full_stats=full), None
        else:
            self.acts, self.stream = None, QuantizedStream(src, windows, full_stats=full)

    def _layer_names(self, layer: int) -> list[str]:
        return sorted(n for n in self.lrq_names if layer_of(n) == layer)

    def _save(self, layer: int, qts: dict) -> None:
        self.store.save(layer, {n: _pack_qt(qt) for n, qt in qts.items()})

    def _load(self, layer: int) -> dict:
        """{tensor name: quantized tensor} of a finished layer; ConvertError naming the file."""
        from ..resume import ResumeError
        try:
            d = self.store.load(layer)
            want = self._layer_names(layer)
            if sorted(d) != want:
                raise self.store.damaged(layer, f"holds {sorted(d)}, this conversion quantizes {want}")
            try:
                return {n: _unpack_qt(v) for n, v in d.items()}
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise self.store.damaged(layer, f"its content does not fit ({type(e).__name__}: {e})") from None
        except ResumeError as e:
            raise ConvertError(str(e)) from None

    def _quantize(self, name: str, w: np.ndarray, st):
        from ..quant import QuantizedTensor, pack
        o = self.opts
        if o.is_two_level(name):
            return None, _two_level_quantize(w, o, st)
        bits = o.bits_for(name)
        try:
            q, d, m = _quantize_with_stats(w, st, o, bits)
        except QuantError as e:
            raise ConvertError(f"tensor {name}: {e}") from None
        return q, QuantizedTensor(pack(q, bits), d, m, bits, o.group_size, o.mode, int(q.shape[1]))

    def quantize(self, name: str, w: np.ndarray):
        layer, linear = layer_of(name), name.split(".")[2]
        if self.stream is None:
            return self._quantize_float(name, w, layer, linear)
        from ..quant import dequantize_codes
        while name not in self.done:
            if self.stream.layer > layer or self.stream.layer >= self.stream.n_layer:
                raise ConvertError(f"tensor {name}: layer {layer} was quantized already "
                                   f"(the tensor is listed twice?)")
            L = self.stream.layer
            if L < self.n_done:            # quantized by an earlier run: replayed, not redone
                qts = self._load(L)
                self.done.update(qts)
                _replay_layer(self.stream, {n.split(".")[2]: _w_hat(qt) for n, qt in qts.items()})
                continue

            def fn(lin: str, st, L=L):
                full = f"blk.{L}.{lin}.weight"
                if full not in self.lrq_names:          # kept in its source type: stays float
                    return None
                q, qt = self._quantize(full, _source_weight(self.by_name[full]), st)
                self.done[full] = qt
                if q is None:                           # the two-level layout
                    from ..quant_two_level import dequantize as tl_dequantize
                    return tl_dequantize(qt)
                return dequantize_codes(q, qt.scale, qt.min, qt.bits, qt.group_size, qt.mode)

            self.stream.quantize_layer(fn)
            if self.store is not None:
                self._save(L, {n: self.done[n] for n in self._layer_names(L)})
        return self.done.pop(name)

    def _quantize_float(self, name: str, w: np.ndarray, layer: int, linear: str):
        """Float stream: each tensor from the source's statistics; with a resume directory a
        finished layer's tensors come from there, and a layer is saved once all its tensors are
        quantized."""
        if self.store is None:
            return self._quantize(name, w, self.acts.linear_stats(layer)[linear])[1]
        if layer < self.n_done:
            if layer not in self.loaded:
                self.loaded = {layer: self._load(layer)}      # tensors come layer after layer
            return self.loaded[layer][name]
        qt = self._quantize(name, w, self.acts.linear_stats(layer)[linear])[1]
        got = self.pending.setdefault(layer, {})
        got[name] = qt
        if sorted(got) == self._layer_names(layer):
            self._save(layer, self.pending.pop(layer))
        return qt


# ---- resume directory (lrq.resume) -------------------------------------------------------------

# options that do not change a layer's quantized tensors: free to differ on a resume (the plan
# and the replicas' initial parameters only add replica tensors around the codes)
_RESUME_FREE = ("progress", "resume", "work", "plan", "grid_offset", "scale_delta", "calib_text")
_RESUME_FLAGS = {"windows": "the calibration windows (--calib-text, its content, --calib-tokens, "
                 "--calib-window)", "two_level": "--layout", "mode": "--asym/--sym/--ternary",
                 "gptq_damp": "--gptq-damp"}


def _resume_dir(src: Path, opts: ConvertOptions, windows: np.ndarray, log):
    import hashlib

    from ..resume import ResumeDir, ResumeError
    o = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _RESUME_FREE}
    o["windows"] = hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()
    try:
        return ResumeDir(opts.resume, "lrq-convert", {"SRC": src}, o, flags=_RESUME_FLAGS, log=log)
    except ResumeError as e:
        raise ConvertError(str(e)) from None


def _pack_qt(qt) -> dict:
    """A quantized tensor as torch tensors and plain values (a layer file, lrq.resume)."""
    import torch
    from ..quant import QuantizedTensor
    if isinstance(qt, QuantizedTensor):
        return {"kind": "single", "codes": torch.from_numpy(np.ascontiguousarray(qt.codes)),
                "scale": torch.from_numpy(np.ascontiguousarray(qt.scale)),
                "min": None if qt.min is None else torch.from_numpy(np.ascontiguousarray(qt.min)),
                "bits": qt.bits, "group_size": qt.group_size, "mode": qt.mode, "n_in": qt.n_in}
    from ..quant_two_level import to_file
    codes, d, dmin, sub = to_file(qt)
    return {"kind": "two-level", "codes": torch.from_numpy(np.ascontiguousarray(codes)),
            "d": torch.from_numpy(np.ascontiguousarray(d)), "dmin": torch.from_numpy(np.ascontiguousarray(dmin)),
            "sub": torch.from_numpy(np.ascontiguousarray(sub)), "n_in": qt.n_in, "super_size": qt.super_size}


def _unpack_qt(d: dict):
    from ..quant import QuantizedTensor
    if d["kind"] == "single":
        return QuantizedTensor(d["codes"].numpy(), d["scale"].numpy(),
                               None if d["min"] is None else d["min"].numpy(),
                               int(d["bits"]), int(d["group_size"]), str(d["mode"]), int(d["n_in"]))
    if d["kind"] == "two-level":
        from ..quant_two_level import from_file
        return from_file(d["codes"].numpy(), d["d"].numpy(), d["dmin"].numpy(), d["sub"].numpy(),
                         int(d["n_in"]), int(d["super_size"]))
    raise ValueError(f"unknown tensor kind {d['kind']!r}")


def _w_hat(qt) -> np.ndarray:
    """The dequantized weight the quantized stream ran with (what _CalibratedQuantizer's quantize
    function handed QuantizedStream for this tensor)."""
    from ..quant import QuantizedTensor, dequantize_codes, unpack
    if isinstance(qt, QuantizedTensor):
        return dequantize_codes(unpack(qt.codes, qt.bits, qt.n_in), qt.scale, qt.min, qt.bits,
                                qt.group_size, qt.mode)
    from ..quant_two_level import dequantize as tl_dequantize
    return tl_dequantize(qt)


def _replay_layer(stream, w_hats: dict[str, np.ndarray]) -> None:
    """Advance ``stream`` (lrq.calib.activations.QuantizedStream) through its next block with the
    given dequantized weights, as its quantize_layer does once a layer's weights are chosen (the
    same block pass on the same weights: the same stream, bit for bit)."""
    import torch

    from ..calib.activations import run_block
    blk = stream.ref.blocks[(stream.layer, 0)]
    lin = dict(blk.lin)
    for name, w_hat in w_hats.items():
        want = tuple(lin[name].weight.shape)
        if tuple(np.shape(w_hat)) != want:
            raise ConvertError(f"blk.{stream.layer}.{name}: the resumed weight has shape "
                               f"{np.shape(w_hat)}, the source {want}")
        lin[name] = dataclasses.replace(lin[name], weight=torch.as_tensor(np.asarray(w_hat)).to(stream.ref.dtype))
    with torch.no_grad():
        stream.x = run_block(stream.ref, dataclasses.replace(blk, lin=lin), stream.x, stream.ctx)
    stream.layer += 1


def _two_level_quantize(w: np.ndarray, opts: ConvertOptions, st=None):
    """The two-level layout (lrq.quant_two_level): round to nearest on the searched grid, with
    E[x^2] of the input channels as importance when there are statistics, GPTQ with --gptq."""
    from .. import quant_two_level as tl
    try:
        imp = None if st is None else np.asarray(st.sq_mean, np.float32)
        try:        # the C port: byte-exact with tl.quantize (tests/test_kernels_two_level.py), ~50x faster
            from .._native import kernels
        except ImportError:
            t = tl.quantize(w, imp, super_size=opts.group_size, sub_size=opts.two_level)
        else:
            tl._check_sizes(w.shape[1], opts.group_size, opts.two_level)
            codes, d, dmin, sub = kernels.quantize_two_level(w, opts.group_size, opts.two_level, imp)
            t = tl.from_file(codes, d, dmin, sub, w.shape[1], opts.group_size)
        if opts.gptq and st is not None:     # GPTQ's error feedback onto that grid
            return tl.gptq_quantize(w, st.xtx, imp, damp=opts.gptq_damp, super_size=opts.group_size,
                                    sub_size=opts.two_level, base=t)
        return t
    except (tl.TwoLevelError, ValueError) as e:
        raise QuantError(str(e)) from None


def _refit_quantize(w: np.ndarray, opts: ConvertOptions, bits: int):
    """Round to nearest (--scale-search minmax | mse), then least-squares refits with uniform
    weights (no calibration text: every input channel counts the same)."""
    from ..calib.gptq import refit_codes
    from ..quant import QuantizedTensor, pack, quantize_codes
    q, d, m = refit_codes(w, *quantize_codes(w, bits, opts.group_size, opts.mode,
                                             scale_search=opts.scale_search),
                          bits, opts.group_size, opts.mode)
    return QuantizedTensor(pack(q, bits), d, m, bits, opts.group_size, opts.mode, int(q.shape[1]))


def _write_lrq(writer: GGUFStreamWriter, sp: SourceTensorPlan, t, opts: ConvertOptions,
               acts=None) -> None:
    w = dequantize_tensor(t).astype(np.float32)
    if not np.isfinite(w).all():
        raise ConvertError(f"tensor {t.name}: the source contains NaN or infinite values")
    try:
        if acts is not None:
            qt = acts.quantize(t.name, w)
        elif opts.is_two_level(t.name):
            qt = _two_level_quantize(w, opts)
        elif opts.refits:
            qt = _refit_quantize(w, opts, opts.bits_for(t.name))
        else:
            qt = quantize(w, opts.bits_for(t.name), opts.group_size, opts.mode, scale_search=opts.scale_search,
                          rounding=opts.rounding, noise=opts.noise, seed=tensor_seed(opts.seed, t.name))
    except QuantError as e:
        raise ConvertError(f"tensor {t.name}: {e}") from None
    del w
    if opts.is_two_level(t.name):      # LRQ2 codes, d / dmin per super-block, the sub-block bytes
        from ..quant_two_level import to_file
        codes, d, dmin, sub = to_file(qt)
        writer.write_tensor(t.name, codes)
        writer.write_tensor(scale_name(t.name), d)
        writer.write_tensor(min_name(t.name), dmin)
        writer.write_tensor(sub_name(t.name), sub)
        n_out = qt.n_out
        for r in sp.replicas:
            for p, arr in initial_params(n_out, r, opts.scale_delta, opts.grid_offset).items():
                writer.write_tensor(replica_param_name(t.name, r, p), arr)
        return
    writer.write_tensor(t.name, qt.codes)
    writer.write_tensor(scale_name(t.name), qt.scale)
    if qt.min is not None:
        writer.write_tensor(min_name(t.name), qt.min)
    n_out = qt.n_out
    for r in sp.replicas:
        for p, arr in initial_params(n_out, r, opts.scale_delta, opts.grid_offset).items():
            writer.write_tensor(replica_param_name(t.name, r, p), arr)
