"""Block streaming (issue 20 item 2): the reference executor loads a block when a pass reaches it
and keeps only the last few (``Reference(max_blocks=k)``), and the embedding and output head
when first used (a block-wise job dequantizes only its windows' embedding rows), so calibration
and sequential GPTQ hold a couple of blocks' weights instead of the whole full-precision model.

Each test compares a streamed run with an eager one (every block loaded up front, the oracle's
default) and asks for the same numbers, bit for bit: streaming changes where the weights live,
never what is computed.  The memory bound itself is counted (blocks held at once), not timed:
an eager stream holds every block, above every bound asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrq.calib import calibrate as calibrate_mod
from lrq.calib import activations
from lrq.calib.activations import LINEARS, QuantizedStream, SourceActivations
from lrq.calib.calibrate import CalibrateOptions, calibrate
from lrq.convert import ConvertOptions, convert
from lrq.model_file import open_model
from lrq.reference import STREAM_BLOCKS, Reference
from lrq.reference.executor import BlockCache, ReferenceError

# the tiny llama, its calibration text and windows; the tiny MoE models
from test_calib import src, text_file, windows  # noqa: F401
from test_moe import moe_models  # noqa: F401

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N_TOKENS = 24


def _tokens(ref: Reference) -> np.ndarray:
    return np.random.default_rng(0).integers(1, ref.tok_embd.shape[0], N_TOKENS)


@pytest.fixture(scope="module")
def replicated(src, tmp_path_factory):  # noqa: F811
    """The tiny llama with serial repeats and a parallel group: blocks of one layer under
    several replicas, a layer visited twice."""
    out = tmp_path_factory.mktemp("streaming") / "rep.gguf"
    n = open_model(src).hparams.n_layer
    convert(src, out, ConvertOptions(bits=4, group_size=32, plan=f"0..{n - 1},{n - 2}..{n - 1}",
                                     grid_offset=0.5, progress=False))
    return out


@pytest.mark.parametrize("max_blocks", [1, 2])
def test_streamed_reference_gives_the_eager_logits(src, replicated, max_blocks):  # noqa: F811
    for path in (src, replicated):
        eager = Reference(open_model(path))
        streamed = Reference(open_model(path), max_blocks=max_blocks)
        assert isinstance(streamed.blocks, BlockCache) and not streamed.blocks.held()
        t = _tokens(eager)
        assert np.array_equal(streamed.logits(t), eager.logits(t))
        b = streamed.blocks
        assert b.peak == max_blocks < len(eager.blocks)
        assert len(b.held()) == max_blocks
        # one pass loads each execution's block once (a layer run twice is loaded twice when
        # the blocks in between pushed it out)
        assert len(eager.schedule) >= b.loads >= len(eager.blocks)


def test_streamed_moe_reference_drops_the_experts_with_the_layer(moe_models):  # noqa: F811
    path = moe_models.gguf("qwen2moe")
    eager = Reference(open_model(path))
    streamed = Reference(open_model(path), max_blocks=1)
    t = _tokens(eager)
    assert np.array_equal(streamed.logits(t), eager.logits(t))
    last = streamed.hp.n_layer - 1
    # the router and stacked experts of the layers no longer held are gone with them
    assert set(streamed._moe) == {last} and set(streamed._norms) == {last}
    assert streamed.blocks.held() == [(last, 0)]


def test_embedding_rows_without_the_matrix(tiny_models, tmp_path):
    """A Q8_0 source (its embedding quantized): embed() dequantizes only the windows' rows and
    gives tok_embd[ids]'s values; a streamed SourceActivations never loads the embedding or the
    output head whole, and its block outputs are the eager ones."""
    q8 = tiny_models.gguf("llama", "q8_0")
    assert open_model(q8).tensor_type("token_embd.weight") == "Q8_0"
    ids = np.random.default_rng(1).integers(0, 100, size=(3, 16))
    lazy, eager = Reference(open_model(q8), torch.float32, max_blocks=1), Reference(open_model(q8), torch.float32)
    assert torch.equal(lazy.embed(ids), eager.tok_embd[torch.from_numpy(ids)])
    assert lazy._tok_embd is None and lazy._output is None
    streamed = SourceActivations(q8, ids)
    control = SourceActivations(q8, ids, reference=eager)
    for layer in range(streamed.n_layer):
        assert torch.equal(streamed.block_output(layer), control.block_output(layer))
    assert streamed.ref._tok_embd is None and streamed.ref._output is None


def test_missing_block_tensor_is_refused_before_any_work(src, text_file, windows, tmp_path, capsys):  # noqa: F811
    """Loading blocks late must not turn a damaged source into a failure halfway through a long
    job: a missing block tensor is refused when the stream is made, by name (lrq-calibrate: one
    line, exit 1)."""
    from gguf_edit import rewrite

    from lrq.cli.calibrate import main as calibrate_cli
    n = open_model(src).hparams.n_layer
    bad = rewrite(src, tmp_path / "bad.gguf", drop=(f"blk.{n - 1}.ffn_up.weight",))
    with pytest.raises(ReferenceError, match=f"tensor 'blk.{n - 1}.ffn_up.weight' is missing"):
        SourceActivations(bad, windows)
    lrq = tmp_path / "in.gguf"
    convert(src, lrq, ConvertOptions(bits=2, group_size=32, progress=False))
    assert calibrate_cli(["-q", "--source", str(bad), "--text", str(text_file), "--tokens", "256",
                          "--window", "64", str(lrq), str(tmp_path / "out.gguf")]) == 1
    err = capsys.readouterr().err
    assert "bad.gguf" in err and f"blk.{n - 1}.ffn_up.weight" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.gguf").exists()


def test_block_cache_refuses_what_it_cannot_hold(src):  # noqa: F811
    with pytest.raises(ReferenceError, match="max_blocks must be >= 1"):
        Reference(open_model(src), max_blocks=0)
    with pytest.raises(KeyError):
        Reference(open_model(src), max_blocks=1).blocks[(99, 0)]


def test_source_activations_stream_two_blocks(src, windows):  # noqa: F811
    """The calibrator's view of the source: every block's output and every linear's statistics
    equal to an eager reference's, with at most STREAM_BLOCKS blocks held."""
    streamed = SourceActivations(src, windows)
    eager = SourceActivations(src, windows, reference=Reference(open_model(src), torch.float32))
    n = streamed.n_layer
    for layer in range(n):
        assert torch.equal(streamed.block_output(layer), eager.block_output(layer))
        a, b = streamed.linear_stats(layer), eager.linear_stats(layer)
        for name in LINEARS:
            assert np.array_equal(a[name].xtx, b[name].xtx) and a[name].n == b[name].n
    assert streamed.ref.blocks.peak <= STREAM_BLOCKS < n


def test_quantized_stream_holds_two_blocks(src, windows):  # noqa: F811
    qs = QuantizedStream(src, windows)
    for _ in range(qs.n_layer):
        # the source's weights kept: the stream is the float one, layer after layer
        qs.quantize_layer(lambda name, st: None)
    eager = SourceActivations(src, windows, reference=Reference(open_model(src), torch.float32))
    assert torch.equal(qs.x, eager.block_output(qs.n_layer - 1))
    assert qs.ref.blocks.peak <= STREAM_BLOCKS < qs.n_layer


def test_select_statistics_streamed_equal_the_eager_ones(src, windows):  # noqa: F811
    """lrq-select's capture (all windows through a block, then the next) on a streamed
    reference gives the sums a window-by-window pass on the eager reference gives."""
    from lrq.select.measure import CaptureReference, capture_stats
    m = open_model(src)
    streamed = CaptureReference(m, torch.float32, max_blocks=STREAM_BLOCKS)
    a = capture_stats(streamed, windows)
    eager = CaptureReference(m, torch.float32)
    eager.stats = {}
    for w in windows:          # the window-by-window pass of the eager reference
        eager.hidden(w)
    b = eager.stats
    assert sorted(a) == sorted(b) == list(range(m.hparams.n_layer))
    for k in a:
        assert (a[k].n, a[k].s1, a[k].s2, a[k].sa) == (b[k].n, b[k].s1, b[k].s2, b[k].sa)
    assert streamed.blocks.peak <= STREAM_BLOCKS < m.hparams.n_layer


def test_calibration_streamed_writes_the_eager_file(src, text_file, tmp_path, monkeypatch):  # noqa: F811
    """lrq-calibrate with the source streamed writes the same bytes as with the whole source in
    memory (STREAM_BLOCKS = None: Reference's eager default)."""
    n = open_model(src).hparams.n_layer
    lrq = tmp_path / "in.gguf"
    convert(src, lrq, ConvertOptions(bits=2, group_size=32, plan=f"0..{n - 1},{n - 1}", progress=False))
    held = []

    class Spy(SourceActivations):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            held.append(self.ref.blocks)

    monkeypatch.setattr(calibrate_mod, "SourceActivations", Spy)
    opts = dict(text=str(text_file), n_tokens=256, window=64, steps=3, progress=False)
    calibrate(lrq, tmp_path / "streamed.gguf", src, CalibrateOptions(**opts))
    monkeypatch.setattr(activations, "STREAM_BLOCKS", None)     # the name activations reads
    calibrate(lrq, tmp_path / "eager.gguf", src, CalibrateOptions(**opts))
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "eager.gguf").read_bytes()
    assert isinstance(held[0], BlockCache) and held[0].peak <= 2 < n
    assert isinstance(held[1], dict) and len(held[1]) == n       # the control held every block


def test_distillation_targets_stream_the_source(src, windows):  # noqa: F811
    """lrq-distill's reference pass runs the source block by block over every window (at most
    STREAM_BLOCKS blocks held) and gives the eager reference's log-probabilities, bit for bit."""
    from lrq.calib.distill import _targets, reference_target
    streamed = Reference(open_model(src), torch.float32, max_blocks=STREAM_BLOCKS)
    got = _targets(streamed, windows, 0, None, {}, False)
    eager = Reference(open_model(src), torch.float32)
    want = torch.stack([reference_target(eager.forward(w), 0)["logp"] for w in windows])
    assert torch.equal(got["logp"], want)
    assert isinstance(streamed.blocks, BlockCache) and streamed.blocks.peak <= STREAM_BLOCKS < eager.hp.n_layer
