"""A random model of a real model family's shape, as an F16 GGUF written tensor by tensor.

Issue 20 item 1 measures how the pipeline's memory, disk and time grow with the model; models
of 0.5B-7B shape cannot be downloaded here, and their quality does not matter for that, only
their shapes.  The shapes come from a `transformers` config (Qwen2Config with the published
sizes of Qwen2.5-0.5B / 3B / 7B), the keys and the tokenizer from a template GGUF of the same
family (the bundled Qwen2.5-Coder-1.5B): a model llama.cpp, the converter and the reference all
take.  Weights are N(0, 0.02) (norms 1, biases 0), generated one tensor at a time, so writing a
7B file holds one tensor (the 1 GB embedding at most), never the model.

    python bench/synth_model.py qwen2.5-3b out/growth/qwen2.5-3b.f16.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

# the published shapes (config.json of each model on the Hugging Face hub)
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    # the method's target; its shape is used for extrapolation (a 65 GB F16 file is not written here)
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
}
TEMPLATE = "qwen2.5-1.5b"          # lrq's bundled asset of the same family (keys, tokenizer)
STD = 0.02
F32, F16 = 0, 1


def block_tensors(n_embd: int, n_ff: int, n_kv: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name suffix, numpy shape) of one qwen2 block."""
    return [("attn_norm.weight", (n_embd,)), ("attn_q.weight", (n_embd, n_embd)), ("attn_q.bias", (n_embd,)),
            ("attn_k.weight", (n_kv, n_embd)), ("attn_k.bias", (n_kv,)),
            ("attn_v.weight", (n_kv, n_embd)), ("attn_v.bias", (n_kv,)),
            ("attn_output.weight", (n_embd, n_embd)), ("ffn_norm.weight", (n_embd,)),
            ("ffn_gate.weight", (n_ff, n_embd)), ("ffn_up.weight", (n_ff, n_embd)),
            ("ffn_down.weight", (n_embd, n_ff))]


def block_params(name: str) -> int:
    c = SHAPES[name]
    d, f = c["hidden_size"], c["intermediate_size"]
    n_kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    return sum(int(np.prod(s)) for _, s in block_tensors(d, f, n_kv))


def n_params(name: str, n_vocab: int = 151936) -> int:
    c = SHAPES[name]
    d = c["hidden_size"]
    return n_vocab * d * (1 if c["tie_word_embeddings"] else 2) + d + c["num_hidden_layers"] * block_params(name)


def write(name: str, out: Path, seed: int = 0) -> Path:
    import gguf
    from transformers import Qwen2Config

    from lrq import assets
    from lrq.gguf_write import GGUFStreamWriter

    cfg = Qwen2Config(**SHAPES[name])
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    n_kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    tpl = gguf.GGUFReader(assets.path(TEMPLATE))
    n_vocab = len(tpl.fields["tokenizer.ggml.tokens"].data)
    hp = {"qwen2.block_count": L, "qwen2.embedding_length": d, "qwen2.feed_forward_length": f,
          "qwen2.attention.head_count": cfg.num_attention_heads,
          "qwen2.attention.head_count_kv": cfg.num_key_value_heads}
    tensors = [("token_embd.weight", (n_vocab, d)), ("output_norm.weight", (d,))]
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", (n_vocab, d)))
    tensors += [(f"blk.{i}.{s}", shape) for i in range(L) for s, shape in block_tensors(d, f, n_kv)]
    rng = np.random.default_rng(seed)
    with GGUFStreamWriter(out, "qwen2") as w:
        for k, fld in tpl.fields.items():
            if k.startswith("GGUF.") or k == "general.architecture":
                continue
            if k in hp:
                w.add_uint32(k, hp[k])
            elif k == "general.file_type":
                w.add_uint32(k, int(gguf.LlamaFileType.MOSTLY_F16))
            elif k in ("general.name", "general.size_label"):
                w.add_string(k, f"random {name}" if k == "general.name" else name.split("-")[-1].upper())
            else:
                w.copy_field(fld)
        for t, shape in tensors:
            w.add_tensor_info(t, shape, F16 if len(shape) == 2 else F32)
        w.write_header()
        for t, shape in tensors:
            if len(shape) == 1:
                a = np.ones(shape, np.float32) if t.endswith("norm.weight") else np.zeros(shape, np.float32)
            else:
                a = np.empty(shape, np.float16)
                for r0 in range(0, shape[0], 4096):      # float32 scratch of 4096 rows at most
                    a[r0:r0 + 4096] = (STD * rng.standard_normal((min(4096, shape[0] - r0), shape[1]),
                                                                 dtype=np.float32)).astype(np.float16)
            w.write_tensor(t, a)
        w.finish()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write(a.shape, a.out, a.seed)
    print(f"wrote {a.out}: {n_params(a.shape) / 1e9:.2f} B parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
