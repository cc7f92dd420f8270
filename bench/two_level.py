"""Does a two-level 2-bit layout (lrq.quant_two_level: 4-bit sub-block scales and mins under an
fp16 super-scale and super-min, llama.cpp's Q2_K structure) beat lrq's fp16-scale groups at equal
bits per weight? (issue 12, item 3)

1. Weight error: every block linear of the F32 reference, importance-weighted relative error
   ``sum_oi E[x_i^2] (w - w^)^2 / sum_oi E[x_i^2] w^2`` (E[x_i^2] from llama-imatrix's file) for
   two-level S=256 with sub-blocks of 16 and of 32, and lrq's asym 2-bit groups g32/g64/g128 with
   MSE scales, MSE + weighted refit, act-mse, act-mse + refit; each with its exact bits per
   weight (the row widths of this model: a 576-wide row has a 64-wide last super-block).
2. End to end: fake-quantized F32 GGUFs (block linears replaced by their dequantized weights,
   everything else as in the reference) of the chosen variants, scored with
   ``llama-perplexity --kl-divergence`` against the cached F32 reference logits (lrq.eval.run),
   round to nearest everywhere (no calibration).

3. ``--gptq 32,16``: the two-level layout quantized by GPTQ (lrq.quant_two_level.gptq_quantize:
   parameters from the importance-weighted search, then GPTQ's error feedback) on the quantized
   model's own stream (lrq.calib.activations.QuantizedStream, sub-layer by sub-layer, as
   lrq-convert --gptq does), 4096 tokens of sotu-calib, damping 0.1; scored like step 2.

    python bench/two_level.py                                  # all layers, 4 files scored
    python bench/two_level.py --layers 0,3,15,29 --no-e2e      # weight errors only (minutes)
    python bench/two_level.py --no-weights --gptq 32           # GPTQ file(s) only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from lrq import quant_two_level as tl                                  # noqa: E402
from lrq.calib.gptq import refit_codes, weighted_quantize_codes        # noqa: E402
from lrq.quant import dequantize_codes, quantize_codes                 # noqa: E402

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SHORT = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
         "ffn_up": "up", "ffn_down": "down"}
GROUPS = (32, 64, 128)
LRQ_METHODS = ("mse", "mse+refit", "act-mse", "act-mse+refit")


def lrq_bits(n_out: int, n_in: int, g: int) -> int:
    """2-bit codes plus fp16 scale and min per group (the last group of a row may be shorter)."""
    return n_out * (2 * n_in + 32 * (-(-n_in // g)))


def variants() -> dict:
    """name -> f(w, imp) -> (w_hat float32, bits of the tensor)."""
    out = {}
    for sub in tl.SUB_SIZES:
        def f(w, imp, sub=sub):
            t = tl.quantize(w, imp, sub_size=sub)
            return tl.dequantize(t).astype(np.float32), w.shape[0] * tl.row_bits(w.shape[1], sub_size=sub)
        out[f"two-level S256/{sub}"] = f
    for g in GROUPS:
        for meth in LRQ_METHODS:
            def f(w, imp, g=g, meth=meth):
                if meth.startswith("act-mse"):
                    q, d, m = weighted_quantize_codes(w, 2, g, "asym", imp, refit=meth.endswith("refit"))
                else:
                    q, d, m = quantize_codes(w, 2, g, "asym", scale_search="mse")
                    if meth.endswith("refit"):
                        q, d, m = refit_codes(w, q, d, m, 2, g, "asym", importance=imp)
                return (dequantize_codes(q, d, m, 2, g, "asym").astype(np.float32),
                        lrq_bits(*w.shape, g))
            out[f"LRQ2 g{g} {meth}"] = f
    return out


def rel_err(w: np.ndarray, w_hat: np.ndarray, imp: np.ndarray) -> tuple[float, float]:
    e = w.astype(np.float64) - w_hat
    return float((imp * e * e).sum()), float((imp * w.astype(np.float64) ** 2).sum())


def load(ref: Path, imatrix: Path):
    import gguf
    r = gguf.GGUFReader(ref)
    im = {t.name: np.array(t.data) for t in gguf.GGUFReader(imatrix).tensors}
    return r, im


def importance(im: dict, name: str) -> np.ndarray:
    s2, n = im.get(f"{name}.in_sum2"), im.get(f"{name}.counts")
    if s2 is None or n is None:
        raise SystemExit(f"imatrix: no in_sum2/counts for {name}")
    return (s2.reshape(-1) / float(n.reshape(-1)[0])).astype(np.float64)


def write_fake_quant(ref_reader, replace, out: Path) -> None:
    """F32 GGUF: the reference with every tensor for which ``replace(name, data)`` returns an
    array swapped for it (computed one tensor at a time: peak memory is one tensor)."""
    import gguf
    from lrq.gguf_write import GGUFStreamWriter
    arch = bytes(ref_reader.fields["general.architecture"].parts[-1]).decode()
    with GGUFStreamWriter(out, arch) as w:
        for k, f in ref_reader.fields.items():
            if k.startswith("GGUF.") or k == "general.architecture":
                continue
            w.copy_field(f)
        for t in ref_reader.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise SystemExit(f"{t.name}: the reference must be all F32, found {t.tensor_type.name}")
            w.add_tensor_info(t.name, np.array(t.data).shape, int(gguf.GGMLQuantizationType.F32))
        w.write_header()
        for t in ref_reader.tensors:
            data = np.array(t.data)
            a = replace(t.name, data)
            w.write_tensor(t.name, np.ascontiguousarray(data if a is None else a, dtype=np.float32))
        w.finish()


def main(argv=None) -> int:
    from lrq.fetch import cache_dir
    ev = cache_dir() / "eval"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, default=ev / "SmolLM2-135M-Instruct.Q4_1.F32.gguf")
    ap.add_argument("--imatrix", type=Path,
                    default=ev / "SmolLM2-135M-Instruct.Q4_1.F32.imatrix-sotu-calib-c512-n64.gguf")
    ap.add_argument("--layers", default="all", help="comma-separated block indices (default all)")
    ap.add_argument("--no-e2e", action="store_true", help="weight errors only")
    ap.add_argument("--e2e", default="two-level S256/16,two-level S256/32,best g64,best g32",
                    help="variants scored end to end ('best gN': the LRQ method with the lowest "
                         "overall weight error at group size N)")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="sotu-eval")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lrq-two-level"))
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--no-weights", action="store_true", help="skip steps 1-2 (weight table, RTN files)")
    ap.add_argument("--gptq", default="", help="sub-block sizes to run GPTQ with, e.g. 32,16")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--gptq-damp", type=float, default=0.1)
    a = ap.parse_args(argv)
    for p in (a.ref, a.imatrix):
        if not p.is_file():
            raise SystemExit(f"{p}: not found (lrq-eval --ref smollm2-135m makes the F32 reference "
                             f"and its imatrix)")
    reader, im = load(a.ref, a.imatrix)
    names = {t.name: t for t in reader.tensors}
    n_layer = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("blk."))
    layers = range(n_layer) if a.layers == "all" else [int(x) for x in a.layers.split(",")]
    result = {"layers": list(layers), "weight_error": [], "e2e": [], "gptq": []}
    if not a.no_weights:
        weights_and_rtn(a, reader, im, names, layers, result)
    for sub in [int(x) for x in a.gptq.split(",") if x.strip()]:
        result["gptq"].append(gptq_row(a, reader, names, n_layer, sub))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


def gptq_row(a, reader, names, n_layer: int, sub: int) -> dict:
    """Two-level GPTQ on the quantized stream -> fake-quantized file -> KLD row."""
    from lrq.calib import calibration_windows
    from lrq.calib.activations import QuantizedStream
    from lrq.eval.run import base_logits, evaluate_model
    t0 = time.monotonic()
    stream = QuantizedStream(a.ref, calibration_windows(a.ref, "sotu-calib", a.calib_tokens, 512))
    deq, nbits, nw = {}, 0, 0
    for L in range(n_layer):
        def fn(lin, st, L=L):
            nonlocal nbits, nw
            name = f"blk.{L}.{lin}.weight"
            w = np.array(names[name].data, dtype=np.float32)
            t = tl.gptq_quantize(w, st.xtx, st.sq_mean, damp=a.gptq_damp, sub_size=sub)
            nbits += w.shape[0] * tl.row_bits(w.shape[1], sub_size=sub)
            nw += w.size
            deq[name] = tl.dequantize(t).astype(np.float32)
            return deq[name]
        stream.quantize_layer(fn)
        print(f"gptq S256/{sub}: layer {L} done ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    quant_s = time.monotonic() - t0
    base = base_logits(a.ref, a.text, ctx=512, chunks=a.chunks, threads=a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    out = a.work / f"fq-gptq-two-level-{sub}.gguf"
    write_fake_quant(reader, lambda name, data: deq.get(name), out)
    r = evaluate_model(out, base, label=f"two-level S256/{sub} GPTQ", threads=a.threads)
    out.unlink()
    row = {"variant": f"two-level S256/{sub} GPTQ (quantized stream, {a.calib_tokens} tokens, "
                      f"damping {a.gptq_damp})", "bpw": nbits / nw, "ppl": r.ppl, "ppl_err": r.ppl_err,
           "kld": r.kld, "kld_err": r.kld_err, "top1": r.top1, "quantize_seconds": quant_s}
    print(f"| {row['variant']} | {row['bpw']:.4f} | {r.ppl:.2f} ± {r.ppl_err:.2f} | "
          f"{r.kld:.4f} ± {r.kld_err:.4f} | {100 * r.top1:.1f} % |", flush=True)
    return row


def weights_and_rtn(a, reader, im, names, layers, result) -> None:
    """Steps 1 and 2 of the module doc (fills result["weight_error"] and result["e2e"])."""
    V = variants()
    e2e_wanted = [] if a.no_e2e else [s.strip() for s in a.e2e.split(",") if s.strip()]
    if e2e_wanted and a.layers != "all":
        raise SystemExit("--e2e needs every layer (use --no-e2e with --layers)")

    # per variant: {linear type: [num, den, tensors, rel-err sum]}, bits, weights
    stats = {v: {k: [0.0, 0.0, 0, 0.0] for k in LINEARS} for v in V}
    bits = {v: 0 for v in V}
    nweights = 0
    seconds = {v: 0.0 for v in V}
    t_start = time.monotonic()
    for L in layers:
        for lin in LINEARS:
            name = f"blk.{L}.{lin}.weight"
            w = np.array(names[name].data, dtype=np.float32)
            imp = importance(im, name)
            nweights += w.size
            for v, f in V.items():
                t0 = time.monotonic()
                w_hat, b = f(w, imp)
                seconds[v] += time.monotonic() - t0
                num, den = rel_err(w, w_hat, imp)
                s = stats[v][lin]
                s[0] += num; s[1] += den; s[2] += 1; s[3] += num / den
                bits[v] += b
        print(f"layer {L} done ({time.monotonic() - t_start:.0f} s)", file=sys.stderr, flush=True)

    def overall(v):
        return sum(s[3] for s in stats[v].values()) / sum(s[2] for s in stats[v].values())

    rows = []
    for v in V:
        rows.append({"variant": v, "bpw": bits[v] / nweights, "overall": overall(v),
                     **{SHORT[k]: stats[v][k][3] / stats[v][k][2] for k in LINEARS},
                     "seconds": seconds[v]})
    print(f"\nImportance-weighted relative weight error (mean over {len(layers)} layers' tensors), "
          f"bpw over the block linears\n")
    cols = ["bpw"] + [SHORT[k] for k in LINEARS] + ["overall"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['variant']} | {r['bpw']:.4f} | " + " | ".join(f"{r[c]:.4f}" for c in cols[1:]) + " |")

    result["weight_error"] = rows
    if e2e_wanted:
        from lrq.eval.run import base_logits, evaluate_model
        chosen = []
        for s in e2e_wanted:
            if s.startswith("best g"):
                g = int(s[6:])
                cands = [f"LRQ2 g{g} {m}" for m in LRQ_METHODS]
                chosen.append(min(cands, key=overall))
            elif s in V:
                chosen.append(s)
            else:
                raise SystemExit(f"--e2e: unknown variant '{s}' (known: {', '.join(V)}, best gN)")
        base = base_logits(a.ref, a.text, ctx=512, chunks=a.chunks, threads=a.threads)
        a.work.mkdir(parents=True, exist_ok=True)
        print(f"\nEnd to end: {a.text}, {a.chunks} chunks of 512, KLD against the F32 reference "
              f"(PPL {base.result.ppl:.2f})\n")
        print("| variant | bpw (linears) | PPL | KLD | top-1 |")
        print("|---|---|---|---|---|")
        for v in chosen:
            out = a.work / ("fq-" + v.replace(" ", "_").replace("/", "-").replace("+", "p") + ".gguf")
            lin_names = {f"blk.{L}.{k}.weight" for L in layers for k in LINEARS}

            def replace(name, data, f=V[v]):
                # the same deterministic quantizer as the weight-error pass, run again here so
                # that no dequantized model is held in memory
                return f(data.astype(np.float32), importance(im, name))[0] if name in lin_names else None

            write_fake_quant(reader, replace, out)
            r = evaluate_model(out, base, label=v, threads=a.threads)
            row = {"variant": v, "bpw": bits[v] / nweights, "ppl": r.ppl, "ppl_err": r.ppl_err,
                   "kld": r.kld, "kld_err": r.kld_err, "top1": r.top1, "seconds": r.seconds}
            result["e2e"].append(row)
            print(f"| {v} | {row['bpw']:.4f} | {r.ppl:.2f} ± {r.ppl_err:.2f} | {r.kld:.4f} ± {r.kld_err:.4f} "
                  f"| {100 * r.top1:.1f} % |", flush=True)
            out.unlink()


if __name__ == "__main__":
    sys.exit(main())
