"""rpc-server runs LRQ files: a patched ggml-rpc-server on 127.0.0.1 takes every layer of an LRQ
model (llama-completion --rpc -ngl 99) and produces the same greedy text as the CPU alone."""

from __future__ import annotations

import re

from lrq import tools
from lrq.convert import ConvertOptions, convert
from rpc_tap import start_rpc_server

PROMPT = "the old man said"


def _complete(model, extra):
    proc = tools.run("llama-completion", ["-m", model, "-p", PROMPT, "-n", "12", "-no-cnv", "--temp", "0",
                                          "-t", "2", "--no-warmup", "-v", *extra], timeout=120)
    return proc.stdout, proc.stderr


def test_rpc_server_runs_lrq_layers(tiny_models, tmp_path):
    lrq = tmp_path / "tiny-lrq2.gguf"
    convert(tiny_models.gguf("llama"), lrq, ConvertOptions(bits=2, group_size=32, plan="all", progress=False))
    server, port = start_rpc_server()
    try:
        text_rpc, log_rpc = _complete(lrq, ["--rpc", f"127.0.0.1:{port}", "-ngl", "99"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    text_cpu, _ = _complete(lrq, [])
    # the weights went to the RPC device, and every layer (execution) with them
    # (llama.cpp first prints a 0.00 MiB line while fitting parameters, then the real load)
    sizes = re.findall(r"RPC0\[127\.0\.0\.1:\d+\] model buffer size =\s*([0-9.]+) MiB", log_rpc)
    assert sizes and max(map(float, sizes)) > 0, log_rpc[-2000:]
    assert re.search(r"offloaded (\d+)/\1 layers to GPU", log_rpc), log_rpc[-2000:]
    assert text_rpc == text_cpu and text_cpu.strip().startswith(PROMPT), log_rpc[-3000:]
