"""What layer-level replication costs on a mixture-of-experts model (docs/moe.md).

    flock /tmp/lrq-heavy.lock .venv/bin/python bench/moe_cost.py [--threads 2] [--reps 3]

A random Qwen3Moe (transformers, seeded; 6 layers, d=512, 32 experts of 256, top-2: 80 M
parameters of which ~12 % active per token, about the proportions of a Qwen3-30B-A3B),
converted by the pinned convert_hf_to_gguf.py and quantized by llama-quantize Q4_0
(lrq-convert --base-type Q4_0, router F32), then llama-bench with load-time layer maps
(--lrq-layers): none, the last layer twice, the last half twice, every layer twice.  A replicated
MoE layer re-runs its attention, its router and the experts its tokens pick (ggml_mul_mat_id),
never all experts, so the added cost is that of the active parameters.  Random weights: speed
only, no quality.  Prints a markdown table.

A second table: expert-level replication (format v4, docs/moe.md), one serial entry per layer
replicating the top 20 % of the experts (6 of 32; the random model routes about uniformly, so
any 6 experts take about 20 % of the routed slots) or all 32, with per-expert gains and biases;
each by the skipping variant (the default on a CPU-only machine: the replica multiplies only
the routed slots of its experts) and the masked one (LRQ_MOE_MASKED=1: every routed slot); the
rows run round-robin --rounds times and the fastest of each is kept.
The load average before and after each table is printed: figures under a load above the
thread count are busy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from lrq import tools  # noqa: E402
from tiny_moe import convert_moe_hf_dir, make_tiny_moe_hf  # noqa: E402

N_LAYER = 6
SHAPE = dict(hidden_size=512, moe_intermediate_size=256, num_experts=32, num_experts_per_tok=2,
             num_hidden_layers=N_LAYER, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
MAPS = {"none": None, "last layer x2": f"{N_LAYER - 1}x2",
        "last half x2": ",".join(f"{i}x2" for i in range(N_LAYER // 2, N_LAYER)),
        "every layer x2": f"0..{N_LAYER - 1},0..{N_LAYER - 1}"}


N_EXPERT = SHAPE["num_experts"]
TOP = N_EXPERT // 5          # the top 20 %: 6 of 32
EXPERT_ROWS = {"none": (None, False), f"top 20 % ({TOP} of {N_EXPERT}), skipping": (TOP, False),
               f"all {N_EXPERT}, skipping": (N_EXPERT, False), f"top 20 % ({TOP} of {N_EXPERT}), masked": (TOP, True),
               f"all {N_EXPERT}, masked": (N_EXPERT, True)}


def llama_bench(model: Path, layers: str | None, threads: int, reps: int, pp: int, tg: int,
                env: dict | None = None) -> tuple[float, float]:
    cmd = [str(tools.tool("llama-bench")), "-m", str(model), "-p", str(pp), "-n", str(tg), "-r", str(reps),
           "-t", str(threads), "-o", "json"] + (["--lrq-layers", layers] if layers else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    res = json.loads(proc.stdout)
    return (next(r["avg_ts"] for r in res if r["n_prompt"] == pp and r["n_gen"] == 0),
            next(r["avg_ts"] for r in res if r["n_gen"] == tg and r["n_prompt"] == 0))


def expert_file(f32: Path, work: Path, n: int) -> Path:
    """Stock Q4_0 base with one serial entry per layer on experts 0..n-1 (weight 1) and random
    per-expert gains / biases on the listed rows (rule X4: defaults elsewhere)."""
    import numpy as np
    from gguf_edit import rewrite
    from lrq.model_file import open_model
    out = work / f"moe-q4_0-x{n}.gguf"
    if out.is_file():
        return out
    plan = work / f"experts-{n}.json"
    plan.write_text(json.dumps({"experts": [{"layer": L, "experts": list(range(n)), "mode": "serial", "weight": 1.0}
                                            for L in range(N_LAYER)]}))
    base = work / f"moe-q4_0-x{n}.base.gguf"
    subprocess.run([str(Path(sys.executable).parent / "lrq-convert"), "-q", "--base-type", "Q4_0",
                    "--work", str(work), "--plan", str(plan), str(f32), str(base)], check=True)
    f, rng, add = open_model(base), np.random.default_rng(0), {}
    for L in range(N_LAYER):
        for proj in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            n_exp, n_out = f.tensor_info(f"blk.{L}.{proj}.weight").shape[:2]
            g, b = np.ones((n_exp, n_out), np.float32), np.zeros((n_exp, n_out), np.float32)
            g[:n] += 0.1 * rng.standard_normal((n, n_out)).astype(np.float32)
            b[:n] += 0.01 * rng.standard_normal((n, n_out)).astype(np.float32)
            add[f"blk.{L}.{proj}.lrq_x1.gain"] = (g, 0)   # ggml type 0: F32
            add[f"blk.{L}.{proj}.lrq_x1.bias"] = (b, 0)
    rewrite(base, out, add=add)
    return out


def _load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--work", type=Path, help="keep the model files here (default: a temporary directory)")
    ap.add_argument("--no-experts", action="store_true", help="only the layer-map table")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds of the expert table (fastest kept)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lrq-moe-cost-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        f32 = work / "moe-f32.gguf"
        if not f32.is_file():
            convert_moe_hf_dir(make_tiny_moe_hf("qwen3moe", work / "hf", **SHAPE), f32)
        q4 = work / "moe-q4_0.gguf"
        if not q4.is_file():
            subprocess.run([str(Path(sys.executable).parent / "lrq-convert"), "-q", "--base-type", "Q4_0",
                            "--work", str(work), "--plan", "none", str(f32), str(q4)], check=True)
        print(f"random qwen3moe {SHAPE}, stock Q4_0 base, llama-bench pp{args.pp} / tg{args.tg}, "
              f"{args.threads} threads, {args.reps} reps\n")
        print(_load())
        print("| layer map | executions | pp t/s | tg t/s | pp cost | tg cost |")
        print("|---|---|---|---|---|---|")
        base = None
        for name, layers in MAPS.items():
            pp, tg = llama_bench(q4, layers, args.threads, args.reps, args.pp, args.tg)
            base = base or (pp, tg)
            n_exec = N_LAYER if layers is None else (2 * N_LAYER if ".." in layers else N_LAYER + layers.count("x"))
            print(f"| {name} (`{layers or '-'}`) | {n_exec} | {pp:.1f} | {tg:.1f} | "
                  f"{base[0] / pp:.2f}x | {base[1] / tg:.2f}x |", flush=True)
        print(_load())
        if args.no_experts:
            return 0
        files = {n: expert_file(f32, work, n) for n in (TOP, N_EXPERT)}
        print("\nexpert-level replication: one serial entry per layer, per-expert gain and bias\n")
        print(_load())
        print("| replicated experts per layer | variant | pp t/s | tg t/s | pp cost | tg cost |")
        print("|---|---|---|---|---|---|")
        # rows round-robin, --rounds times, the fastest of each kept: a neighbour's burst on a
        # shared machine slows one call, never speeds one up
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, (n, masked) in EXPERT_ROWS.items():
                model = q4 if n is None else files[n]
                pp, tg = llama_bench(model, None, args.threads, args.reps, args.pp, args.tg,
                                     {"LRQ_MOE_MASKED": "1" if masked else "0"})
                old = best.get(name, (0.0, 0.0))
                best[name] = (max(old[0], pp), max(old[1], tg))
        base = None
        for name, (n, masked) in EXPERT_ROWS.items():
            pp, tg = best[name]
            base = base or (pp, tg)
            label, variant = (name, "-") if n is None else name.rsplit(", ", 1)
            print(f"| {label} | {variant} | {pp:.1f} | {tg:.1f} | {base[0] / pp:.2f}x | {base[1] / tg:.2f}x |",
                  flush=True)
        print(_load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
