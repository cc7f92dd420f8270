"""Open a model file (plain GGUF or LRQ GGUF) behind one read-only interface.

The reference executor (lrq.reference) consumes only this interface:

    m = open_model("model.gguf")
    m.arch, m.hparams.n_layer, m.schedule          # schedule: list[Execution]
    m.tensor("blk.0.attn_norm.weight")             # float64, numpy shape
    W, p = m.weight("blk.0.attn_q.weight", replica=0)

Contract of ``weight(name, replica) -> (W, lrq.quant.ReplicaParams)``: ``W`` is the
dequantized weight of that replica (float64 [n_out, n_in]); when it already includes the
per-output gain, ``params.gain_folded`` is True and the gain must not be applied again;
otherwise the executor computes ``gain * (W @ act(x))``.  The replica's ``bias`` is added after
the matmul and its activation clip/quant (``act_clip``, ``act_bits``) applies to the input.
For a plain GGUF every replica is the stored tensor and the parameters are the defaults.

A file with the key ``lrq.format_version`` (or an ``lrq-*`` architecture) is opened by
``lrq.lrq_file.LRQModelFile``, which implements the same interface.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .gguf_meta import GGUFMetaError, check_tensor_extents, read_metadata

from .plan import Execution
from .quant import ReplicaParams

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe")
LRQ_FORMAT_KEY = "lrq.format_version"
LRQ_ARCH_PREFIX = "lrq-"

# llama.cpp's rope layout per architecture: llama's q/k rows are permuted by
# convert_hf_to_gguf.py so that rotated pairs are adjacent (NORM); qwen2/qwen3 keep HF's
# half-split layout (NEOX).  See llama_model_rope_type() in src/llama-model.cpp.
ROPE_TYPE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox", "qwen2moe": "neox", "qwen3moe": "neox"}

# tokenizer.ggml.pre values for which llama.cpp turns add_bos on for a BPE ("gpt2") vocab
# (src/llama-vocab.cpp, llama_vocab::impl::load); an explicit add_bos_token key overrides.
_BPE_PRE_ADD_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                    "midm-2.0", "lfm2", "jina-v5-nano", "tekken", "chameleon"}


class ModelFileError(ValueError):
    """A model file is missing, unreadable, inconsistent, or of an unsupported architecture."""


@dataclass(frozen=True)
class RopeScaling:
    type: str                    # "linear" | "yarn" | ...  (llama.cpp's rope.scaling.type)
    factor: float
    original_context: int | None = None


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters as llama.cpp reads them from the GGUF (keys ``<arch>.*``)."""
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int                # key/query head size (attention.key_length)
    head_dim_v: int              # value head size (attention.value_length)
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rope_dim: int                # rotated dims per head (rope.dimension_count)
    rope_type: str               # "norm" (adjacent pairs) | "neox" (halves)
    rope_scaling: RopeScaling | None
    rms_eps: float
    attn_scale: float            # softmax scale of q.k (1/sqrt(head_dim) unless the file says)
    tied_embeddings: bool        # no output.weight: the output head is token_embd
    qk_norm: bool                # per-head RMS norms on q and k (qwen3)
    attn_qkv_bias: bool          # q/k/v projection biases (qwen2)
    has_rope_freqs: bool         # a rope_freqs.weight tensor divides the frequencies (llama3)
    # mixture of experts (qwen2moe, qwen3moe; 0 for a dense model): experts per MoE layer and
    # experts each token uses (<arch>.expert_count, <arch>.expert_used_count)
    n_expert: int = 0
    n_expert_used: int = 0

    @classmethod
    def from_mapping(cls, d, has_tensor=None) -> "HParams":
        """An HParams from a dict of the documented keys (e.g. lrq.gguf_hparams.hparams());
        fields the dict lacks are derived as llama.cpp does (rope type from the arch, softmax
        scale 1/sqrt(head_dim), no rope scaling; rope_freqs from ``has_tensor``)."""
        if isinstance(d, cls):
            return d
        d = dict(d)
        arch = d["arch"]
        if arch not in ROPE_TYPE:
            raise ModelFileError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        head_dim = int(d.get("head_dim", d["n_embd"] // d["n_head"]))
        return cls(
            arch=arch, n_layer=int(d["n_layer"]), n_embd=int(d["n_embd"]), n_head=int(d["n_head"]),
            n_head_kv=int(d.get("n_head_kv", d["n_head"])), head_dim=head_dim,
            head_dim_v=int(d.get("head_dim_v", head_dim)), n_ff=int(d["n_ff"]),
            n_vocab=int(d["n_vocab"]), n_ctx_train=int(d.get("n_ctx_train", 0)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_dim=int(d.get("rope_dim", head_dim)), rope_type=d.get("rope_type", ROPE_TYPE[arch]),
            rope_scaling=d.get("rope_scaling"), rms_eps=float(d["rms_eps"]),
            attn_scale=float(d.get("attn_scale") or head_dim ** -0.5),
            tied_embeddings=bool(d["tied_embeddings"]), qk_norm=bool(d.get("qk_norm", False)),
            attn_qkv_bias=bool(d.get("attn_qkv_bias", d.get("attn_bias", False))),
            has_rope_freqs=bool(d.get("has_rope_freqs",
                                      has_tensor("rope_freqs.weight") if has_tensor else False)),
            n_expert=int(d.get("n_expert", 0)), n_expert_used=int(d.get("n_expert_used", 0)),
        )

    def __getitem__(self, key: str):
        """Dict-style access (``hp["n_layer"]``), as lrq-design.md describes hparams."""
        return getattr(self, key)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Vocab:
    """What the executors need of the tokenizer (tokenizing is llama.cpp's job)."""
    model: str                   # tokenizer.ggml.model: "llama" (SPM), "gpt2" (BPE), ...
    pre: str | None
    n_tokens: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool                # llama_vocab_get_add_bos(): prepend BOS / perplexity's BOS swap
    add_eos: bool


DEFAULT_REPLICA_PARAMS = ReplicaParams()


def open_model(path: str | os.PathLike, adapter: str | os.PathLike | None = None,
               layers: str | None = None):
    """Open a plain GGUF (``ModelFile``) or an LRQ GGUF (``lrq.lrq_file.LRQModelFile``); with an
    adapter (FORMAT.md 11) or a layer map (7.1), the view of that base with it as one LRQ model
    (``lrq.adapter.BoundModelFile``; a stock base is seen as a v3 file with stock-typed weights)."""
    path = Path(path)
    if adapter is not None or layers is not None:
        from .adapter import BoundModelFile
        return BoundModelFile(path, adapter, layers)
    try:
        meta = read_metadata(path)
    except GGUFMetaError as e:
        raise ModelFileError(str(e)) from None
    arch = meta.get("general.architecture")
    if LRQ_FORMAT_KEY in meta or (isinstance(arch, str) and arch.startswith(LRQ_ARCH_PREFIX)):
        try:
            from .lrq_file import LRQModelFile
        except ImportError as e:
            raise ModelFileError(f"{path}: is an LRQ file but lrq.lrq_file cannot be imported ({e})") from e
        return LRQModelFile(path)
    return ModelFile(path, meta)


class ModelFile:
    """A plain GGUF of a supported architecture, tensors dequantized by gguf-py on demand."""

    def __init__(self, path: str | os.PathLike, meta: dict | None = None):
        import gguf  # deferred: importing gguf-py costs ~0.3 s
        from .gguf_lean import LeanGGUFReader
        self.path = Path(path)
        try:
            if meta is None or "GGUF.tensor_infos" not in meta:
                # a caller's own key/values (lrq_file passes its kv) lack the tensor table
                meta = read_metadata(self.path) if meta is None else {**read_metadata(self.path), **meta}
        except GGUFMetaError as e:
            raise ModelFileError(str(e)) from None
        self.meta = meta
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelFileError(f"{self.path}: unsupported architecture {arch!r}; "
                                 f"supported: {', '.join(SUPPORTED_ARCHS)}")
        self.arch: str = arch
        try:   # before gguf-py, whose errors on a short file do not say what is wrong
            check_tensor_extents(self.path, meta, {int(t): s for t, s in gguf.GGML_QUANT_SIZES.items()})
        except GGUFMetaError as e:
            raise ModelFileError(str(e)) from None
        try:
            self._reader = LeanGGUFReader(self.path, "r")
        except Exception as e:  # gguf-py raises ValueError/IndexError/... on damaged files
            raise ModelFileError(f"{self.path}: cannot read GGUF tensors ({type(e).__name__}: {e}); "
                                 f"the file is corrupt") from e
        self._tensors = {t.name: t for t in self._reader.tensors}
        from .gguf_hparams import GGUFFileError, check_tokens_unique
        try:
            check_tokens_unique(self.tokens, str(self.path))
        except GGUFFileError as e:
            raise ModelFileError(str(e)) from None
        self.hparams = self._read_hparams()

    # ---- validation ---------------------------------------------------------------------

    def _key(self, suffix: str, default=None, required: bool = False):
        key = f"{self.arch}.{suffix}"
        v = self.meta.get(key, default)
        if v is None and required:
            raise ModelFileError(f"{self.path}: required key '{key}' is missing")
        return v

    def _read_hparams(self) -> HParams:
        n_layer = int(self._key("block_count", required=True))
        n_embd = int(self._key("embedding_length", required=True))
        n_head = self._scalar_per_layer("attention.head_count", required=True)
        n_head_kv = self._scalar_per_layer("attention.head_count_kv", default=n_head)
        n_ff = self._scalar_per_layer("feed_forward_length", required=True)
        head_dim = int(self._key("attention.key_length", n_embd // n_head))
        head_dim_v = int(self._key("attention.value_length", head_dim))
        emb = self._require_tensor("token_embd.weight")
        n_vocab = int(self._key("vocab_size", int(emb.shape[1])))
        scaling = None
        stype = self._key("rope.scaling.type")
        factor = self._key("rope.scaling.factor") or self._key("rope.scale_linear")
        if (stype and stype != "none") or (factor and factor != 1.0):
            scaling = RopeScaling(stype or "linear", float(factor or 1.0),
                                  self._key("rope.scaling.original_context_length"))
        attn_scale = float(self._key("attention.scale", 0.0) or 0.0) or head_dim ** -0.5
        return HParams(
            arch=self.arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=n_vocab,
            n_ctx_train=int(self._key("context_length", 0)),
            rope_theta=float(self._key("rope.freq_base", 10000.0)),
            rope_dim=int(self._key("rope.dimension_count", head_dim)),
            rope_type=ROPE_TYPE[self.arch], rope_scaling=scaling,
            rms_eps=float(self._key("attention.layer_norm_rms_epsilon", required=True)),
            attn_scale=attn_scale,
            tied_embeddings="output.weight" not in self._tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self._tensors,
            attn_qkv_bias="blk.0.attn_q.bias" in self._tensors,
            has_rope_freqs="rope_freqs.weight" in self._tensors,
            n_expert=int(self._key("expert_count", 0)), n_expert_used=int(self._key("expert_used_count", 0)),
        )

    def _scalar_per_layer(self, suffix: str, default=None, required: bool = False) -> int:
        """Some converters write per-layer arrays; this executor needs them uniform."""
        key = f"{self.arch}.{suffix}"
        if key in self.meta and self.meta[key] is None:   # an array (read_metadata skips them)
            vals = [int(x) for x in self._reader.fields[key].contents()]
            if len(set(vals)) != 1:
                raise ModelFileError(f"{self.path}: '{key}' varies per layer ({vals}); unsupported")
            return vals[0]
        return int(self._key(suffix, default, required))

    def _require_tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: tensor '{name}' is missing") from None

    # ---- public interface ----------------------------------------------------------------
    @cached_property
    def schedule(self) -> list[Execution]:
        """Plain file: each base layer once, replica 0, each its own serial group."""
        return [Execution(layer=i, replica=0, group=i, weight=1.0)
                for i in range(self.hparams.n_layer)]

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        return self._require_tensor(name).tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float64, numpy shape (``[n_out, n_in]`` for weights)."""
        from gguf import quants
        t = self._require_tensor(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelFileError(f"{self.path}: tensor '{name}' has type {t.tensor_type.name}, "
                                 f"which gguf-py cannot dequantize") from e
        return np.asarray(arr, dtype=np.float64).reshape(shape)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """float64 rows ``ids`` of a 2-D tensor (numpy's first axis), dequantizing only those."""
        from .gguf_hparams import dequantize_rows
        t = self._require_tensor(name)
        if len(t.shape) != 2:
            raise ModelFileError(f"{self.path}: rows() needs a 2-D tensor, '{name}' has shape "
                                 f"{list(reversed(t.shape.tolist()))}")
        try:
            return dequantize_rows(t, ids)
        except NotImplementedError as e:
            raise ModelFileError(f"{self.path}: tensor '{name}' has type {t.tensor_type.name}, "
                                 f"which gguf-py cannot dequantize") from e

    def weight(self, name: str, replica: int = 0) -> tuple[np.ndarray, ReplicaParams]:
        """(W float64 [n_out, n_in], ReplicaParams): a plain file has one copy of every weight,
        which every replica uses, with default parameters."""
        if replica < 0:
            raise ModelFileError(f"{self.path}: replica index {replica} < 0 for '{name}'")
        return self.tensor(name), DEFAULT_REPLICA_PARAMS

    # ---- tokenizer metadata ----------------------------------------------------------------
    @cached_property
    def vocab(self) -> Vocab:
        m = self.meta
        model = m.get("tokenizer.ggml.model", "llama")
        pre = m.get("tokenizer.ggml.pre")
        if "tokenizer.ggml.add_bos_token" in m:
            add_bos = bool(m["tokenizer.ggml.add_bos_token"])
        else:  # llama.cpp's per-vocab-type default
            add_bos = model in ("llama", "bert") or (model == "gpt2" and pre in _BPE_PRE_ADD_BOS)
        add_eos = bool(m.get("tokenizer.ggml.add_eos_token", model == "t5"))
        n_tokens = (len(self._reader.fields["tokenizer.ggml.tokens"].data)
                    if "tokenizer.ggml.tokens" in self._reader.fields else self.hparams.n_vocab)
        return Vocab(model=model, pre=pre, n_tokens=n_tokens,
                     bos_id=m.get("tokenizer.ggml.bos_token_id"),
                     eos_id=m.get("tokenizer.ggml.eos_token_id"), add_bos=add_bos, add_eos=add_eos)

    @cached_property
    def tokens(self) -> list[str]:
        """The token strings (tokenizer.ggml.tokens), id order."""
        f = self._reader.fields.get("tokenizer.ggml.tokens")
        from .gguf_hparams import read_field
        return [] if f is None else list(read_field(f))

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    def __repr__(self) -> str:
        hp = self.hparams
        return (f"ModelFile({str(self.path)!r}, arch={self.arch}, n_layer={hp.n_layer}, "
                f"n_embd={hp.n_embd}, n_vocab={hp.n_vocab})")
