"""Per-expert calibration of expert replicas (format v4, docs/moe.md).

    lrq-calibrate IN.gguf OUT.gguf --source F32.gguf [--text sotu-calib] [--tokens 2048] [--window 256]

IN is an LRQ file with expert-replication entries (lrq-convert --plan with an "experts" list,
usually with quantized experts: --base-type Q4_0); SOURCE is the unquantized model it was made
from.  On the calibration text, the file's own float32 reference records the input h of every
MoE FFN and its routing (once per execution, as the runtime computes it).  For each entry and
each expert e it lists, on the tokens routed to e, a per-output-channel gain and bias (a 1-D
least-squares fit, ridge toward the default) make the replica's expert approach the source's:

- parallel entry, weight a:  gate_r and up_r fit the source's gate / up pre-activations;
  down_r fits  E + (E_f - E) / a,  so that E' = E + a (E_r - E) = E_f  where the fit is exact;
- serial entry, weight a:  gate_r and up_r keep the defaults; down_r fits  (E_f - E) / a,
  so that E' = E + a E_r = E_f  (a residual correction of the expert's output).

E is the file's expert (the quantized one), E_f the source's.  An expert routed fewer than
MIN_TOKENS times keeps the no-op parameters (parallel: gain 1 / bias 0; serial: down gain 0).
One expert in two entries of one layer is refused (the fits assume one replica per expert).
The rows of unlisted experts keep the defaults (rule X4); the output is validated by the reader
before it replaces anything.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from ..constants import EXPERT_PROJS, expert_param_name
from ..gguf_hparams import numpy_shape, open_reader
from ..gguf_write import GGUFStreamWriter
from ..lrq_file import LRQFileError, LRQModelFile
from ..model_file import open_model

# experts routed fewer times than this keep the no-op parameters (a fit on a handful of tokens
# is noise)
MIN_TOKENS = 8
# ridge toward the default gain, relative to the variance of the fitted product
RIDGE = 1e-3
F32 = int(gguf.GGMLQuantizationType.F32)


class ExpertCalibError(ValueError):
    """The file, the source or the entries cannot be calibrated (the message names which)."""


def _fit(y: np.ndarray, t: np.ndarray, g_default: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column j: (g_j, b_j) minimising ||g y_j + b - t_j||^2 + RIDGE n var(y_j) (g - g_default)^2."""
    my, mt = y.mean(axis=0), t.mean(axis=0)
    yc, tc = y - my, t - mt
    var, cov = (yc * yc).mean(axis=0), (yc * tc).mean(axis=0)
    g = (cov + RIDGE * var * g_default) / ((1 + RIDGE) * var + 1e-30)
    return g, mt - g * my


def capture(f: LRQModelFile, windows: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{layer: (h [N, n_embd], expert ids [N, k])}: the MoE FFN inputs and routing of every
    execution of every MoE layer on the windows (the file's reference, float32)."""
    from ..reference import Reference
    ref = Reference(f, torch.float32)
    seen: dict[int, list] = {}
    for layer, moe in ref._moe.items():
        def route(h, _orig=moe.route, _layer=layer):
            w, idx = _orig(h)
            seen.setdefault(_layer, []).append((h.double().numpy(), idx.numpy()))
            return w, idx
        moe.route = route
    with torch.no_grad():
        for win in windows:
            ref.logits(win)
    return {L: (np.concatenate([h for h, _ in v]), np.concatenate([i for _, i in v])) for L, v in seen.items()}


def fit_entries(f: LRQModelFile, source, inputs: dict) -> dict[str, np.ndarray]:
    """The per-expert gain / bias tensors ({name: F32 [n_expert, n_out]}) of every entry."""
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    out: dict[str, np.ndarray] = {}
    for layer in sorted({e.layer for e in f.expert_entries}):
        entries = [e for e in f.expert_entries if e.layer == layer]
        listed = [x for e in entries for x in e.experts]
        if len(listed) != len(set(listed)):
            dup = next(x for x in listed if listed.count(x) > 1)
            raise ExpertCalibError(f"{f.path}: layer {layer} lists expert {dup} in two entries; the per-expert "
                                   f"fit takes one replica per expert")
        h, idx = inputs[layer]
        wq = {p: f.tensor(f"blk.{layer}.{p}.weight") for p in EXPERT_PROJS}
        try:
            wf = {p: source.tensor(f"blk.{layer}.{p}.weight") for p in EXPERT_PROJS}
        except Exception as e:     # a source without these experts
            raise ExpertCalibError(f"{getattr(source, 'path', 'source')}: no stacked experts of layer {layer} "
                                   f"({e})") from None
        for p in EXPERT_PROJS:
            if wf[p].shape != wq[p].shape:
                raise ExpertCalibError(f"{source.path}: blk.{layer}.{p}.weight has shape {list(wf[p].shape)}, "
                                       f"{f.path} {list(wq[p].shape)}: not the model the file was made from")
        for e in entries:
            par = e.mode == "parallel"
            params = {}
            for p in EXPERT_PROJS:
                n_exp, n_out = wq[p].shape[:2]
                params[p] = [np.ones((n_exp, n_out)), np.zeros((n_exp, n_out))]
            for x in e.experts:
                rows = np.nonzero((idx == x).any(axis=1))[0]
                if len(rows) < MIN_TOKENS or e.weight == 0:
                    if not par:
                        params["ffn_down_exps"][0][x] = 0.0      # the serial no-op
                    continue
                X = h[rows]
                g0, u0 = X @ wq["ffn_gate_exps"][x].T, X @ wq["ffn_up_exps"][x].T
                base = (silu(g0) * u0) @ wq["ffn_down_exps"][x].T
                gf, uf = X @ wf["ffn_gate_exps"][x].T, X @ wf["ffn_up_exps"][x].T
                target = (silu(gf) * uf) @ wf["ffn_down_exps"][x].T
                if par:
                    for p, y, t in (("ffn_gate_exps", g0, gf), ("ffn_up_exps", u0, uf)):
                        params[p][0][x], params[p][1][x] = _fit(y, t, 1.0)
                    (gg, bg), (gu, bu) = ((params[p][0][x], params[p][1][x]) for p in ("ffn_gate_exps", "ffn_up_exps"))
                    y = (silu(gg * g0 + bg) * (gu * u0 + bu)) @ wq["ffn_down_exps"][x].T
                    params["ffn_down_exps"][0][x], params["ffn_down_exps"][1][x] = \
                        _fit(y, base + (target - base) / e.weight, 1.0)
                else:
                    params["ffn_down_exps"][0][x], params["ffn_down_exps"][1][x] = \
                        _fit(base, (target - base) / e.weight, 0.0)
            for p, (g, b) in params.items():
                if not par and p != "ffn_down_exps":
                    continue        # serial: gate / up keep the defaults (no tensor)
                out[expert_param_name(layer, p, e.replica, "gain")] = g.astype(np.float32)
                out[expert_param_name(layer, p, e.replica, "bias")] = b.astype(np.float32)
    return out


def write_with_tensors(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A copy of ``src`` (keys and tensors byte for byte) whose tensors of these names are
    replaced or added (F32); validated by the reader before it appears (a bad file is removed)."""
    r = open_reader(src)
    w = GGUFStreamWriter(dst, str(r.fields["general.architecture"].contents()))
    data = {}
    with w:
        for k, fld in r.fields.items():
            if not k.startswith("GGUF.") and k != "general.architecture":
                w.copy_field(fld)
        for t in r.tensors:
            if t.name in tensors:
                continue
            w.add_tensor_info(t.name, numpy_shape(t), int(t.tensor_type))
            data[t.name] = np.asarray(t.data)
        for name, a in tensors.items():
            w.add_tensor_info(name, a.shape, F32)
            data[name] = a
        w.write_header()
        for name, a in data.items():
            w.write_tensor(name, a)
        w.finish()
    try:
        LRQModelFile(dst).close()
    except LRQFileError:
        dst.unlink(missing_ok=True)
        raise
    return dst


def calibrate_experts(path, out, source, text="sotu-calib", n_tokens: int = 2048,
                      ctx: int = 256) -> dict[str, np.ndarray]:
    from ..select.measure import calib_tokens
    f = LRQModelFile(path)
    if not f.expert_entries:
        raise ExpertCalibError(f"{path}: the file has no expert-replication entries (lrq.moe.*); make them "
                               f"with lrq-convert --plan (an \"experts\" list) or lrq-select --moe")
    src = open_model(source)
    windows = calib_tokens(path, text, n_tokens, ctx)
    tensors = fit_entries(f, src, capture(f, windows))
    write_with_tensors(Path(path), Path(out), tensors)
    return tensors
