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
"""

from __future__ import annotations

import argparse
import json
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


def llama_bench(model: Path, layers: str | None, threads: int, reps: int, pp: int, tg: int) -> tuple[float, float]:
    cmd = [str(tools.tool("llama-bench")), "-m", str(model), "-p", str(pp), "-n", str(tg), "-r", str(reps),
           "-t", str(threads), "-o", "json"] + (["--lrq-layers", layers] if layers else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    res = json.loads(proc.stdout)
    return (next(r["avg_ts"] for r in res if r["n_prompt"] == pp and r["n_gen"] == 0),
            next(r["avg_ts"] for r in res if r["n_gen"] == tg and r["n_prompt"] == 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--work", type=Path, help="keep the model files here (default: a temporary directory)")
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
        print("| layer map | executions | pp t/s | tg t/s | pp cost | tg cost |")
        print("|---|---|---|---|---|---|")
        base = None
        for name, layers in MAPS.items():
            pp, tg = llama_bench(q4, layers, args.threads, args.reps, args.pp, args.tg)
            base = base or (pp, tg)
            n_exec = N_LAYER if layers is None else (2 * N_LAYER if ".." in layers else N_LAYER + layers.count("x"))
            print(f"| {name} (`{layers or '-'}`) | {n_exec} | {pp:.1f} | {tg:.1f} | "
                  f"{base[0] / pp:.2f}x | {base[1] / tg:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
