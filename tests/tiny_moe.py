"""Tiny random mixture-of-experts models (Qwen2Moe, Qwen3Moe) and their GGUF conversions.

Built like tests/tiny_models.py (seeded random weights from a `transformers` config, the local
SentencePiece tokenizer, the pinned ``convert_hf_to_gguf.py`` as a subprocess), with one
difference: the pinned converter's ``Qwen2MoeModel`` (and ``Qwen3MoeModel`` through it) reads
only a BPE ``tokenizer.json`` and checks its pre-tokenizer hash against a list of known
models, which a tokenizer trained here cannot pass.  The subprocess therefore runs this file,
which points that one method at the converter's own SentencePiece reader (what ``Qwen2Model``
already tries first) and then runs the unmodified converter.  Tensors and metadata are the
converter's: only the vocabulary reader differs.

No real MoE weights are reachable from this machine, so these models test the code paths (the
routing, the stacked experts, the schedule), never quality.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import (BIAS_STD, CONVERT_SCRIPT, LLAMA_CPP, NORM_JITTER, TINY_VOCAB,  # noqa: E402
                         WEIGHT_STD, TinyModelError, load_tiny_hf, save_random_model)

MOE_ARCHS = ("qwen2moe", "qwen3moe", "mixtral")
# the GGUF architecture each one converts to: Mixtral is llama with experts
GGUF_ARCH = {"qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "mixtral": "llama"}

N_EXPERT = 8
N_EXPERT_USED = 2
# every linear's n_in (64 = hidden, 96 = moe_intermediate_size, 128 = the shared expert's) is a
# multiple of 32 like the dense tiny models'; three different sizes make a transposed expert or
# a swapped gate/down a shape error, not a silent one
_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=192, moe_intermediate_size=96,
    num_experts=N_EXPERT, num_experts_per_tok=N_EXPERT_USED, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    bos_token_id=1, eos_token_id=2, pad_token_id=None, decoder_sparse_step=1, mlp_only_layers=[],
    output_router_logits=False,
)
_DEFAULTS: dict[str, dict] = {
    # shared expert with its sigmoid gate; top-k weights NOT renormalised (llama.cpp: norm_w false)
    "qwen2moe": dict(_COMMON, shared_expert_intermediate_size=128, norm_topk_prob=False,
                     rms_norm_eps=1e-6, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # no shared expert; q/k norms; top-k weights renormalised (llama.cpp hard-codes norm_w true,
    # as every released Qwen3 MoE sets norm_topk_prob)
    "qwen3moe": dict(_COMMON, head_dim=32, norm_topk_prob=True, rms_norm_eps=1e-6,
                     tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # llama with experts: top-k weights renormalised (llama.cpp: norm_w true), tied embeddings
    # like the dense tiny llama; the experts' size is intermediate_size
    "mixtral": dict(_COMMON, intermediate_size=96, num_local_experts=N_EXPERT, router_jitter_noise=0.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
_HF = {"qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
       "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
       "mixtral": ("MixtralConfig", "MixtralForCausalLM")}


def _config(arch: str, overrides: dict):
    import transformers
    if arch not in _HF:
        raise TinyModelError(f"unknown tiny MoE architecture '{arch}'; known: {', '.join(MOE_ARCHS)}")
    cfg_name, hf_arch = _HF[arch]
    kw = dict(_DEFAULTS[arch])
    kw.update(overrides)
    kw.setdefault("initializer_range", WEIGHT_STD)
    return getattr(transformers, cfg_name)(architectures=[hf_arch], **kw)


def _randomize(model, seed: int) -> None:
    """tiny_models' recipe; transformers 5 stores the experts as fused 3-D parameters, which get
    the same std as any other weight."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_JITTER * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=g))
            else:
                p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=g))


def make_tiny_moe_hf(arch: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    return save_random_model(_config(arch, overrides), out_dir, seed, _randomize)


def load_tiny_moe_hf(hf_dir: Path):
    return load_tiny_hf(hf_dir)


def convert_moe_hf_dir(hf_dir: Path, outfile: Path, outtype: str = "f32") -> Path:
    """The pinned convert_hf_to_gguf.py on ``hf_dir`` with the SentencePiece vocabulary reader
    (module docstring); a subprocess of the venv python running this file."""
    if not CONVERT_SCRIPT.is_file():
        raise TinyModelError(f"{CONVERT_SCRIPT} is missing: the llama.cpp tree is not prepared "
                             f"(run `make build`)")
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "convert", str(hf_dir), str(outfile), outtype],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise TinyModelError(f"convert_hf_to_gguf.py failed on {hf_dir} (exit {proc.returncode}):\n{tail}")
    return outfile


def _run_converter(hf_dir: str, outfile: str, outtype: str) -> None:
    import runpy
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    sys.path.insert(0, str(LLAMA_CPP))
    from conversion import qwen
    qwen.Qwen2MoeModel.set_vocab = lambda self: self._set_vocab_sentencepiece()
    sys.argv = [str(CONVERT_SCRIPT), hf_dir, "--outfile", outfile, "--outtype", outtype]
    runpy.run_path(str(CONVERT_SCRIPT), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "convert":
        _run_converter(*sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} convert HF_DIR OUT.gguf OUTTYPE")
