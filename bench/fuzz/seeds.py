"""Seed corpus and dictionary for the LRQ file fuzzers (bench/fuzz/run.py).

    .venv/bin/python bench/fuzz/seeds.py OUT_DIR [--work DIR]

Writes into OUT_DIR real, valid files, each made by lrq's own converter from one tiny random
model, so that the fuzzers start from inputs that get past every check and mutate them from there:

- ``plain-llama.gguf``: the plain F32 source (the stock loader path, no lrq.* keys);
- ``own-asym2.lrq.gguf``: LRQ2 asym codes, group 32, layer 0 run twice in series and layer 1 as
  a parallel group of two replicas, with scale_mult / grid_offset from the converter and gain /
  bias / act set on replica 1;
- ``own-sym3-all.lrq.gguf``: LRQ3 sym codes, plan ``all``;
- ``own-ternary.lrq.gguf``: ternary (LRQ2) codes, group 64, no replicas;
- ``stock-f32.lrq.gguf`` / ``stock-q8_0.lrq.gguf``: format-v2 stock-typed bases (llama-quantize
  made the shared weights) with the same plan, gain / bias / clip on replica 1;
- ``own-qwen2.lrq.gguf``: a qwen2 model (q/k/v biases, untied output head), LRQ2 asym.

and ``lrq.dict``, a libFuzzer / atheris dictionary of every lrq.* key (constants.Keys), the LRQ
tensor-name suffixes, the architecture names and the GGUF value-type ids, which lets mutations
reach the LRQ checks (a random byte flip rarely spells ``lrq.schedule.group``).

The tiny model is smaller than the tests' (d = 32, ffn 64, 2 layers, vocab 100: SentencePiece needs
at least the text's 79 characters + 3 specials): each seed is 25-93 KB.  gguf-py's parse of the
token list is most of a Python execution's time; vocab 100 instead of 320 cuts it by ~40%.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# the seed model; every linear's n_in (32, 64) is a multiple of the group sizes used below
D, FF, N_LAYER = 32, 64, 2
MODEL = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=N_LAYER,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"},
                   "1": {"replicas": 2, "mode": "parallel"}}}


def _tiny_gguf(arch: str, work: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from tiny_models import make_tiny_gguf
    finally:
        sys.path.pop(0)
    return make_tiny_gguf(arch, work / arch, **MODEL)


def make_seeds(out: Path, work: Path | None = None, stock: bool = True) -> list[Path]:
    """Build the seed files (see the module docstring) into ``out``; returns their paths.
    ``stock=False`` skips the stock-typed bases (they need llama-quantize of the main build)."""
    import numpy as np

    from lrq.convert import ConvertOptions, convert
    from lrq.convert.update import set_replica_params

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="lrq-fuzz-seeds-") if work is None else None
    work = Path(tmp.name) if tmp else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    plan = work / "plan.json"
    plan.write_text(json.dumps(PLAN))
    rng = np.random.default_rng(0)
    seeds: list[Path] = []
    try:
        src = _tiny_gguf("llama", work)
        plain = out / "plain-llama.gguf"
        plain.write_bytes(src.read_bytes())
        seeds.append(plain)

        def own(name, opts, params=None, source=src):
            base = work / f"{name}.base.gguf"
            base.unlink(missing_ok=True)
            convert(source, base, ConvertOptions(progress=False, **opts))
            dst = out / f"{name}.lrq.gguf"
            dst.unlink(missing_ok=True)
            if params:
                set_replica_params(base, dst, params)
            else:
                dst.write_bytes(base.read_bytes())
            seeds.append(dst)

        own("own-asym2", dict(bits=2, group_size=32, plan=str(plan), grid_offset=0.5, scale_delta=0.1), {
            "blk.0.attn_q.lrq_r1.gain": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
            "blk.0.attn_q.lrq_r1.bias": (0.01 * rng.standard_normal(D)).astype(np.float32),
            "blk.1.ffn_down.lrq_r1.act": np.array([0.9, 8], np.float32)})
        own("own-sym3-all", dict(bits=3, mode="sym", group_size=32, plan="all", scale_delta=0.05))
        own("own-ternary", dict(bits=2, mode="ternary", group_size=64))
        if stock:
            for base_type in ("F32", "Q8_0"):
                own(f"stock-{base_type.lower()}", dict(base_type=base_type, plan=str(plan),
                                                       work=str(work / f"stock-{base_type}")), {
                    "blk.0.ffn_up.lrq_r1.gain": np.full(FF, 1.1, np.float32),
                    "blk.0.ffn_up.lrq_r1.bias": np.full(FF, 0.01, np.float32),
                    "blk.1.attn_v.lrq_r1.clip": np.array([2.0], np.float32)})
        own("own-qwen2", dict(bits=2, group_size=32, plan=str(plan)), source=_tiny_gguf("qwen2", work))
    finally:
        if tmp:
            tmp.cleanup()
    return seeds


def _dict_escape(b: bytes) -> str:
    return "".join(chr(c) if 0x20 <= c < 0x7f and c not in (0x22, 0x5c) else f"\\x{c:02x}" for c in b)


def write_dict(path: Path) -> Path:
    """A libFuzzer dictionary: lrq.* keys (as GGUF strings: u64 length + bytes, and bare), tensor
    suffixes, architecture and mode names, and the GGUF value-type ids as u32."""
    from lrq.constants import SUPPORTED_ARCHS, Keys, LRQType
    words: list[bytes] = []
    for key in Keys.all().values():
        k = key.encode()
        words += [k, struct.pack("<Q", len(k)) + k]
    for s in ("lrq_scale", "lrq_min", "lrq_r0.", "lrq_r1.", "lrq_r2.", "scale_mult", "grid_offset",
              "gain", "bias", "act", "clip", "general.architecture", "general.alignment",
              "block_count", "asym", "sym", "ternary", "GGUF"):
        words.append(s.encode())
    for a in SUPPORTED_ARCHS:
        words += [a.encode(), b"lrq-" + a.encode(), struct.pack("<Q", 4 + len(a)) + b"lrq-" + a.encode()]
    # GGUF value types 0..12 (uint8 .. float64), the LRQ ggml type ids, small counts
    for v in list(range(13)) + [int(t) for t in LRQType] + [0, 1, 2, 3, 32, 64, 512, 513, 0xFFFFFFFF]:
        words.append(struct.pack("<I", v))
    words += [struct.pack("<f", x) for x in (0.0, -1.0, 0.5, 1.0, float("inf"), float("nan"))]
    words.append(struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))
    seen, lines = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            lines.append(f'"{_dict_escape(w)}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory of the seed files (made if missing)")
    ap.add_argument("--work", type=Path, default=None, help="keep the intermediates here")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock-typed bases")
    ap.add_argument("--dict", type=Path, default=None, help="dictionary path (default OUT/../lrq.dict)")
    args = ap.parse_args(argv)
    seeds = make_seeds(args.out, args.work, stock=not args.no_stock)
    d = write_dict(args.dict or args.out.parent / "lrq.dict")
    for s in seeds:
        print(f"{s}  {s.stat().st_size} bytes")
    print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
