"""llama-cli (the chat client) runs an LRQ file unchanged in its usage: one single-turn answer,
greedy, identical whether the replicated layers' extra replicas are no-ops or absent."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from lrq import assets, tools
from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.lrq_file import LRQModelFile


def _answer(model) -> str:
    proc = subprocess.run([str(tools.tool("llama-cli")), "-m", str(model), "-p", "Name a color.", "-n", "12",
                           "-st", "--temp", "0", "-t", "2"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"> Name a color\.\n(.+?)\n\n\[ Prompt:", proc.stdout, re.S)
    assert m, proc.stdout[-2000:]
    return m.group(1).strip()


@pytest.mark.slow
def test_llama_cli_answers_from_lrq_files(tmp_path):
    src = assets.path("smollm2-135m")
    plain = tmp_path / "lrq4-none.gguf"
    rep = tmp_path / "lrq4-last2.gguf"
    convert(src, plain, ConvertOptions(bits=4, group_size=64, plan="none", progress=False))
    convert(src, rep, ConvertOptions(bits=4, group_size=64, plan="last-2", progress=False))
    # replicas 1 of the last two layers made exact no-ops (zero gain on the output projections)
    f = LRQModelFile(rep)
    params = {f"blk.{l}.{w}.lrq_r1.gain": np.zeros(576, np.float32)
              for l in (28, 29) for w in ("attn_output", "ffn_down")}
    noop = set_replica_params(rep, tmp_path / "lrq4-last2-noop.gguf", params)
    a, b = _answer(plain), _answer(noop)
    assert a and a == b
