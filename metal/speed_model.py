"""Expected decode speed of lrq on Apple Silicon, on paper: a model, not a measurement.

Decode (one token) is a read of every weight of the executed layers plus the output head, so
its ceiling is memory bandwidth / bytes read per token.  This prints, for LRQ2 g64 (asym: codes
2 bits + fp16 d and m per 64 weights), llama.cpp's Q2_K and IQ2_XS, on Qwen2.5-Coder-1.5B and
Qwen2.5-32B:

  - bytes read per token by the block linears (every layer once; with `last-8`, the last 8
    layers run twice and read their codes twice, plus per-group alpha / beta of the replicas),
  - plus the output head (Q6_K, as llama-quantize leaves it in 2-bit files; the token embedding
    reads one row),
  - the decode ceiling at 200 GB/s (M1 Pro), and at 4096 tokens of context with the KV cache
    (F16) read as well,
  - the ALU work the kernel of metal/lrq.metal spends per byte of LRQ2 codes, against what an
    M1 Pro GPU issues per byte it can read.

    python metal/speed_model.py            # the tables of docs/metal.md
"""

from __future__ import annotations

BANDWIDTH = 200e9          # bytes/s, M1 Pro (unified memory)
# M1 Pro GPU, 16 cores: 16 x 128 FP32 lanes at 1.296 GHz = 2.65e12 lane-instructions/s (an FMA
# counts once).  Per byte of bandwidth: 13.3 instructions.
GPU_LANE_OPS = 16 * 128 * 1.296e9
CTX = 4096

MODELS = {
    # name: (n_layer, d_model, d_ff, n_head_kv * head_dim, vocab)
    "Qwen2.5-Coder-1.5B": (28, 1536, 8960, 2 * 128, 151936),
    "Qwen2.5-32B": (64, 5120, 27648, 8 * 128, 152064),
}

# bits per weight of the block linears (type only: llama.cpp's own Q2_K / IQ2_XS files keep
# some tensors at higher types, which this model leaves out for all three alike)
TYPES = {
    "LRQ2 g64 (asym)": 2.0 + 2 * 16 / 64,     # codes + fp16 d, m per 64 weights = 2.5
    "Q2_K": 84 * 8 / 256,                     # 2.625
    "IQ2_XS": 74 * 8 / 256,                   # 2.3125
}
HEAD_BPW = 210 * 8 / 256                      # Q6_K output head, 6.5625
REPLICA_PARAM_BPW = 2 * 16 / 64               # per-group alpha and beta (fp16) of a replica: 0.5
N_REPLICATED = 8                              # `last-8`: the last 8 layers run twice

# metal/lrq.metal's mat-vec kernel, per weight of one row (BITS = 2, NC = 1): code extraction
# (byte load amortised, shift, mask, int -> float: ~3), one FMA with the activation; per 8 weights
# of a row: the group factors (4 half loads and 3 flops, ~7) and 2 FMAs; per 8 weights shared by
# the 4 rows of a simdgroup: 8 activation loads and 8 adds (sum of x).  In lane-instructions:
OPS_PER_WEIGHT = 3 + 1 + (7 + 2) / 8 + (8 + 8) / 8 / 4


def linear_params(n_layer, d, d_ff, kv, vocab):
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * d_ff   # q, o, k, v, gate, up, down
    return per_layer, vocab * d


def main() -> int:
    print(f"# decode model: {BANDWIDTH / 1e9:.0f} GB/s; output head Q6_K; KV cache F16 at {CTX} tokens\n")
    for name, (n_layer, d, d_ff, kv, vocab) in MODELS.items():
        per_layer, head = linear_params(n_layer, d, d_ff, kv, vocab)
        kv_bytes = 2 * n_layer * kv * 2 * CTX                 # K and V, F16, every layer
        print(f"## {name}: {n_layer} layers, {per_layer * n_layer / 1e9:.3f} G linear weights, "
              f"head {head / 1e6:.1f} M, KV {kv_bytes / 1e6:.0f} MB at {CTX} tokens\n")
        print("| type | bpw | plan | GB read / token | tok/s ceiling | at 4k context |")
        print("|---|---|---|---|---|---|")
        for tname, bpw in TYPES.items():
            plans = [("none", 0)]
            if tname.startswith("LRQ"):
                plans.append((f"last-{N_REPLICATED}", N_REPLICATED))
            for plan, n_rep in plans:
                lin = per_layer * (n_layer + n_rep) * bpw / 8 + per_layer * n_rep * REPLICA_PARAM_BPW / 8
                tot = lin + head * HEAD_BPW / 8
                kv_tot = kv_bytes * (n_layer + n_rep) / n_layer
                print(f"| {tname} | {bpw:.4g} | {plan} | {tot / 1e9:.3f} | {BANDWIDTH / tot:.1f} | "
                      f"{BANDWIDTH / (tot + kv_tot):.1f} |")
        print()
    per_byte = OPS_PER_WEIGHT * 4            # 4 weights per byte of LRQ2 codes
    budget = GPU_LANE_OPS / BANDWIDTH
    print(f"## arithmetic per byte (LRQ2, mat-vec kernel of metal/lrq.metal)\n")
    print(f"- kernel: ~{OPS_PER_WEIGHT:.2f} lane-instructions per weight = ~{per_byte:.0f} per byte of codes")
    print(f"- M1 Pro GPU: {GPU_LANE_OPS / 1e12:.2f}e12 lane-instructions/s = {budget:.1f} per byte at "
          f"{BANDWIDTH / 1e9:.0f} GB/s")
    print(f"- so the kernel as written is ALU-bound at ~{GPU_LANE_OPS / per_byte / 1e9:.0f} GB/s of codes "
          f"({GPU_LANE_OPS / per_byte / BANDWIDTH:.0%} of the bandwidth ceiling)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
