"""Tiny random HF models (llama / qwen2 / qwen3) and their GGUF conversions, for fast tests.

Everything is built locally, without any network:
- the model comes from a `transformers` config with random weights (seeded), saved with
  ``save_pretrained`` as float32 safetensors;
- the tokenizer is a small SentencePiece model trained here on the bundled Botchan text
  (``tokenizer.model`` + ``tokenizer_config.json``), which convert_hf_to_gguf.py's
  ``_set_vocab_sentencepiece`` accepts for all three architectures;
- the GGUF comes from the pinned llama.cpp's own ``convert_hf_to_gguf.py`` run as a subprocess
  (never copied), so the tensor layout (q/k permutation for llama, names, metadata) is exactly
  what llama.cpp expects.

    >>> d = make_tiny_hf("qwen3", tmp_path / "hf")          # doctest: +SKIP
    >>> g = make_tiny_gguf("qwen3", tmp_path / "gguf")      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = REPO_ROOT / "build" / "llama.cpp"
CONVERT_SCRIPT = LLAMA_CPP / "convert_hf_to_gguf.py"

ARCHS = ("llama", "qwen2", "qwen3")

# SentencePiece vocabulary of the tiny models: small enough that the output layer is cheap,
# large enough that real words of the texts are single tokens.
TINY_VOCAB = 320
# Characters of Botchan the tokenizer is trained on: enough for a stable vocabulary of 320,
# small enough that training takes well under a second.
_SPM_TRAIN_CHARS = 200_000

# Shapes: every linear's n_in (64, 128, 192) is a multiple of 32 so the LRQ converter can
# quantize every block weight; 4 query heads over 2 KV heads exercise GQA.
_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    bos_token_id=1, eos_token_id=2, pad_token_id=None,
)
_DEFAULTS: dict[str, dict] = {
    # tied embeddings like SmolLM2
    "llama": dict(_COMMON, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # untied output head like Qwen2.5-Coder; q/k/v biases are built into Qwen2
    "qwen2": dict(_COMMON, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # head_dim (32) != hidden / heads (16), as in the real Qwen3 models; q/k RMS norms built in
    "qwen3": dict(_COMMON, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}

# Random weights: HF's default init (std 0.02, norms = 1, biases = 0) gives near-uniform
# attention and logits, and zero biases / unit norms would let a reference that ignores them
# pass.  These values make every parameter matter.
WEIGHT_STD = 0.12
NORM_JITTER = 0.25   # norm weights = 1 + NORM_JITTER * N(0,1)
BIAS_STD = 0.3


class TinyModelError(RuntimeError):
    """A tiny model could not be built or converted."""


def _config(arch: str, overrides: dict):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    classes = {"llama": (LlamaConfig, "LlamaForCausalLM"),
               "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
               "qwen3": (Qwen3Config, "Qwen3ForCausalLM")}
    if arch not in classes:
        raise TinyModelError(f"unknown tiny architecture '{arch}'; known: {', '.join(ARCHS)}")
    cls, hf_arch = classes[arch]
    kw = dict(_DEFAULTS[arch])
    kw.update(overrides)
    kw.setdefault("initializer_range", WEIGHT_STD)
    return cls(architectures=[hf_arch], **kw)


def _randomize(model, seed: int) -> None:
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


def _botchan_text() -> str:
    from lrq import assets
    return assets.path("botchan").read_text(encoding="utf-8")


def train_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB) -> Path:
    """Train a SentencePiece (unigram) model on Botchan into ``out_dir/tokenizer.model``.

    Ids 0/1/2 are <unk>/<s>/</s> as in LLaMA's tokenizer, so llama.cpp's SPM vocab finds its
    special tokens where it expects them.  Single-threaded: the result is deterministic.
    """
    import sentencepiece as spm
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _botchan_text()[:_SPM_TRAIN_CHARS]
    sentences = [line for line in text.splitlines() if line.strip()]
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    prefix.with_suffix(".vocab").unlink(missing_ok=True)
    special = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {i: {"content": c, "special": True} for i, c in special.items()},
        "model_max_length": 2048,
    }, indent=2))
    return prefix.with_suffix(".model")


def make_tiny_hf(arch: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random ``arch`` model (float32 safetensors + tokenizer) into ``out_dir``.

    ``overrides`` are config keyword arguments (e.g. ``num_hidden_layers=2``).  Returns out_dir.
    """
    return save_random_model(_config(arch, overrides), out_dir, seed, _randomize)


def save_random_model(cfg, out_dir: Path, seed: int, randomize) -> Path:
    """Build ``cfg``'s model, fill it with ``randomize(model, seed)``, save it with a tokenizer
    trained here into ``out_dir`` (shared by the dense and the MoE tiny models)."""
    import torch
    from transformers import AutoModelForCausalLM
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(model, seed)
    model.save_pretrained(out_dir)
    train_tokenizer(out_dir, cfg.vocab_size)
    return out_dir


def load_tiny_hf(hf_dir: Path):
    """The saved model in float32 eval mode with eager attention (the most literal math)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


def convert_hf_dir(hf_dir: Path, outfile: Path, outtype: str = "f32") -> Path:
    """Run the pinned convert_hf_to_gguf.py on ``hf_dir`` (subprocess, venv python)."""
    if not CONVERT_SCRIPT.is_file():
        raise TinyModelError(f"{CONVERT_SCRIPT} is missing: the llama.cpp tree is not prepared "
                             f"(run `make build`)")
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(CONVERT_SCRIPT), str(hf_dir), "--outfile", str(outfile),
         "--outtype", outtype],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise TinyModelError(f"convert_hf_to_gguf.py failed on {hf_dir} "
                             f"(exit {proc.returncode}):\n{tail}")
    return outfile


def make_tiny_gguf(arch: str, out_dir: Path, outtype: str = "f32", seed: int = 0,
                   **overrides) -> Path:
    """Build the tiny HF model in ``out_dir/hf`` and convert it to ``out_dir/<arch>-<outtype>.gguf``."""
    out_dir = Path(out_dir)
    hf_dir = make_tiny_hf(arch, out_dir / "hf", seed=seed, **overrides)
    return convert_hf_dir(hf_dir, out_dir / f"tiny-{arch}-{outtype}.gguf", outtype)


def tiny_vocab_text(model: Path, text: str, path: Path) -> Path:
    """Write ``text`` to ``path`` without the characters the tiny SentencePiece vocabulary of
    ``model`` cannot encode (it has no byte fallback, and llama.cpp's tokenizer throws on them)."""
    from lrq import _native
    tok = _native.Model(str(model), n_ctx=64)
    ok = set()
    for ch in set(text):
        try:
            tok.tokenize(ch, add_special=False)
            ok.add(ch)
        except ValueError as e:
            # the binding's refusal of a character the vocabulary has no token for (llama.cpp's
            # SPM tokenizer throws on it): only that means "drop it"; anything else (a broken
            # model, a binding error) fails the caller
            if "has no token for a character" not in str(e):
                raise
    path.write_text("".join(c for c in text if c in ok), encoding="utf-8")
    return path


def tiny_calib_text(model: Path, path: Path) -> Path:
    """The first 20,000 characters of sotu-calib, one line, without the characters the tiny
    vocabulary cannot encode: the calibration text of the tests that fit on the tiny models."""
    from lrq import assets
    return tiny_vocab_text(model, assets.text("sotu-calib")[:20_000].replace("\n", " "), path)
