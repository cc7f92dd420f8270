"""An LRQ model split across two ggml-rpc-server workers on 127.0.0.1 (`--rpc A,B -ngl 99 -ts 1,1`).

llama.cpp splits the *base* layers between the workers; lrq's virtual layers (one per execution
of the schedule) take the device of their base layer (patch 0003, llama_model::load_tensors), so
a replicated layer's executions and their KV caches sit on the worker that holds its codes and
the codes are never copied.  Each worker is reached through a counting relay (rpc_tap.py) that
decodes the RPC requests: the tensors written at load time name the weights each worker holds,
the graphs it is sent name the executions it computes, and the bytes per decoded token are
compared with what the split must move.  Schedules: replicas serial and parallel on the file's
own schedule, and a layer map that revisits every layer after the other worker has run.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from lrq import tools
from lrq.convert import ConvertOptions, convert
from lrq.lrq_file import LRQModelFile
from rpc_tap import RpcTap, data_bytes, start_rpc_server, exec_ids, layer_device, predict_decode

RUN_TIMEOUT_S = 120
PROMPT = "the old man said"
CTX = 2048
# two decode lengths: the per-token traffic is the difference over N_LONG - N_SHORT decode steps
N_SHORT, N_LONG = 4, 12
SPLIT = [1.0, 1.0]                      # -ts 1,1: tiny layers 0, 1 on worker 0; 2 and the head on 1
# file schedule: layer 0 twice serially, layers 1 and 2 as two averaged parallel replicas
PLAN = {"0": {"replicas": 2, "mode": "serial"}, "1": {"replicas": 2, "mode": "parallel"},
        "2": {"replicas": 2, "mode": "parallel"}}
# a layer map that returns to worker 0 after worker 1 ran layer 2 (replicas 0 then 1, serially)
MAP, MAP_LAYERS = "0..2,0..2", [0, 1, 2, 0, 1, 2]
# llama.cpp pins each layer's first norm to the layer's device in batches of PINNED_BATCH tokens
# or more only when fully offloaded (llama_context::graph_get_cb); 8 x 4 words are more tokens
PINNED_BATCH = 32
LONG_PROMPT_REPEAT = 8
# llama.cpp prints buffer sizes in MiB with two decimals; a layer's tensors are also padded to
# the buffer alignment.  One tiny layer is ~19 KB (0.018 MiB): a layer on the wrong worker, or
# a worker holding a copy of another's layer, falls outside MIB_PRINT + n_tensors * ALIGN.
MIB = 1 << 20
MIB_PRINT = 0.005 * MIB
ALIGN = 64
# an execution's K and V cache: 2048 cells x (K 32 + V 32) x f16 = 0.25 MiB, printed exactly
KV_BYTES_PER_EXEC = CTX * (32 + 32) * 2


@pytest.fixture(scope="module")
def workers():
    """Two rpc-servers, each behind a counting relay; yields the relays (in --rpc order)."""
    procs, taps = [], []
    try:
        for _ in range(2):
            p, port = start_rpc_server()
            procs.append(p)
            taps.append(RpcTap(port))
        yield taps
    finally:
        for t in taps:
            t.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def lrq_file(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("rpc-split")
    plan = d / "plan.json"
    plan.write_text(json.dumps({"layers": PLAN}))
    out = d / "tiny-split.gguf"
    convert(tiny_models.gguf("llama"), out, ConvertOptions(bits=2, group_size=32, plan=str(plan), progress=False))
    return out


def _complete(model, n, extra, prompt=PROMPT):
    proc = subprocess.run([str(tools.tool("llama-completion")), "-m", str(model), "-p", prompt, "-n", str(n),
                           "-no-cnv", "--temp", "0", "-t", "2", "-c", str(CTX), "--no-warmup", "-v", *extra],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _run_split(workers, model, n, extra, ngl=99, prompt=PROMPT):
    """One llama-completion run on the two workers: (text, log, per-worker relay counters)."""
    before = [t.snapshot() for t in workers]
    rpc = ",".join(f"127.0.0.1:{t.port}" for t in workers)
    text, log = _complete(model, n, ["--rpc", rpc, "-ngl", str(ngl), *extra], prompt)
    assert all(t.wait_idle() for t in workers), "a relayed connection stayed open after the client exited"
    return text, log, [t.snapshot().minus(b) for t, b in zip(workers, before)]


def _last_per_port(pattern: str, log: str) -> dict[int, float]:
    out = {}
    for port, mib in re.findall(pattern, log):   # the last line wins: the fit pass prints first
        out[int(port)] = float(mib)
    return out


def check_split(model, workers, layers, log, stats) -> list[str]:
    """Problems with the placement of a run: every base layer's weights on exactly one worker, the
    one llama.cpp's split rule gives it under SPLIT, each execution computed and cached there."""
    f = LRQModelFile(model)
    hp = f.hparams_dict
    n_base = hp["n_layer"]
    want_dev = [layer_device(L, n_base, SPLIT) for L in range(n_base)]
    out_dev = layer_device(n_base, n_base, SPLIT)
    ports = [t.port for t in workers]
    problems = []

    def file_bytes(names):
        return sum(f.tensor_info(n).nbytes for n in names)

    # (a) weights, from the bytes the relays saw written at load time
    for k, st in enumerate(stats):
        w, _ = data_bytes(st, weights=True)
        if w == 0:
            problems.append(f"worker {k} holds no weights")
    for L in range(n_base):
        names = [n for n in f.tensor_names if n.startswith(f"blk.{L}.")]
        holders = [k for k, st in enumerate(stats) if any(n in st.set_tensor for n in names)]
        if holders != [want_dev[L]]:
            problems.append(f"layer {L}'s weights on workers {holders}, want [{want_dev[L]}]")
        for k in holders:
            got = sum(stats[k].set_tensor[n] for n in names)
            if got != file_bytes(names):
                problems.append(f"worker {k} got {got} bytes of layer {L}, the file has {file_bytes(names)}")
    # ... and from llama.cpp's own report of each worker's weight buffer
    head = ["output_norm.weight", "output.weight" if f.has_tensor("output.weight") else "token_embd.weight"]
    bufs = _last_per_port(r"load_tensors: RPC\d+\[127\.0\.0\.1:(\d+)\] model buffer size =\s*([0-9.]+) MiB", log)
    for k, port in enumerate(ports):
        names = [n for n in f.tensor_names for L in range(n_base) if want_dev[L] == k and n.startswith(f"blk.{L}.")]
        names += head if out_dev == k else []
        want, got = file_bytes(names), bufs.get(port, 0.0) * MIB
        if abs(got - want) > MIB_PRINT + ALIGN * len(names):
            problems.append(f"worker {k}: model buffer {got / MIB:.2f} MiB, its layers hold {want / MIB:.4f} MiB")
    # executions: computed where their base layer is (graph node names 'name-<execution>'),
    # their KV cache there too (llama.cpp's per-layer device lines and KV buffer sizes)
    want_exec = [{e for e, L in enumerate(layers) if want_dev[L] == k} for k in range(len(workers))]
    for k, st in enumerate(stats):
        if exec_ids(st.graph_nodes) != want_exec[k]:
            problems.append(f"worker {k} computes executions {sorted(exec_ids(st.graph_nodes))}, want {sorted(want_exec[k])}")
    dev_port = {name: int(port) for name, port in re.findall(r"using device (RPC\d+) \(127\.0\.0\.1:(\d+)\)", log)}
    kv_dev = dict(re.findall(r"llama_kv_cache: layer\s+(\d+): dev = (\S+)", log))
    for e, L in enumerate(layers):
        if dev_port.get(kv_dev.get(str(e))) != ports[want_dev[L]]:
            problems.append(f"execution {e} (layer {L}): KV cache on {kv_dev.get(str(e))}, want worker {want_dev[L]}")
    kv = _last_per_port(r"llama_kv_cache: RPC\d+\[127\.0\.0\.1:(\d+)\] KV buffer size =\s*([0-9.]+) MiB", log)
    for k, port in enumerate(ports):
        want = len(want_exec[k]) * KV_BYTES_PER_EXEC
        if abs(kv.get(port, 0.0) * MIB - want) > MIB_PRINT:
            problems.append(f"worker {k}: KV buffer {kv.get(port, 0.0):.2f} MiB, want {want / MIB:.2f} MiB")
    return problems


def _layers_of(model, extra):
    return MAP_LAYERS if "--lrq-layers" in extra else [e.layer for e in LRQModelFile(model).schedule]


@pytest.mark.parametrize("extra", [[], ["--lrq-layers", MAP]], ids=["file-schedule", "layer-map"])
def test_split_places_executions_with_their_codes(workers, lrq_file, extra):
    layers = _layers_of(lrq_file, extra)
    ts = ["-ts", ",".join(f"{s:g}" for s in SPLIT)]
    _, _, short = _run_split(workers, lrq_file, N_SHORT, ts + extra)
    text, log, long = _run_split(workers, lrq_file, N_LONG, ts + extra)
    assert check_split(lrq_file, workers, layers, log, long) == [], log[-3000:]
    assert not any(st.protocol_errors for st in long), [st.protocol_errors for st in long]

    # llama.cpp's own account (patch 0012): the device order of the executions, and a warning
    # exactly when the schedule comes back to a worker it has left
    names = {int(port): name for name, port in re.findall(r"using device (RPC\d+) \(127\.0\.0\.1:(\d+)\)", log)}
    n_base = LRQModelFile(lrq_file).hparams_dict["n_layer"]
    dev = [layer_device(L, n_base, SPLIT) for L in layers]
    runs = [e for e in range(len(dev)) if e == 0 or dev[e] != dev[e - 1]] + [len(dev)]
    want_order = " -> ".join(f"{names[workers[dev[a]].port]} {a}..{b - 1}" for a, b in zip(runs, runs[1:]))
    assert re.findall(r"LRQ: executions by device, in schedule order: (.*)", log)[-1] == want_order
    returns = len(runs) - 1 > len(set(dev))
    assert bool(re.search(r"LRQ: execution \d+ \(layer \d+\) returns to RPC\d", log)) == returns

    # (b) the same greedy text as the CPU alone (the workers run the same CPU kernels)
    text_cpu, _ = _complete(lrq_file, N_LONG, extra)
    assert text == text_cpu and text_cpu.strip().startswith(PROMPT)

    # traffic per decoded token: exactly the hidden-state hand-overs of the split, the logits and
    # the graph inputs (the protocol is deterministic: byte-exact).  An execution on the other
    # worker than its codes adds two hand-overs (2 x 4 x n_embd = 512 bytes here); a weight
    # copied per step adds kilobytes; a missing graph input or hand-over removes bytes.
    f = LRQModelFile(lrq_file)
    want = predict_decode([layer_device(L, n_base, SPLIT) for L in layers], layer_device(n_base, n_base, SPLIT),
                          f.hparams_dict["n_embd"], f.hparams_dict["n_vocab"])
    steps = N_LONG - N_SHORT
    for k in range(len(workers)):
        w, r = (b - a for a, b in zip(data_bytes(short[k]), data_bytes(long[k])))
        assert (w / steps, r / steps) == (want.to_worker.get(k, 0), want.from_worker.get(k, 0)), (k, want)
        assert data_bytes(long[k], weights=True) == data_bytes(short[k], weights=True)   # loads the same


def test_split_ngl_counts_base_layers(workers, lrq_file):
    """-ngl n_base + 1 offloads every base layer and the output, so every execution: a prompt
    (32 tokens or more, where llama.cpp pins a layer's first norm only when fully offloaded)
    keeps each execution on its codes' worker.  Without patch 0012 the comparison with the
    number of executions fails, and the first norm of an execution after a change of worker runs
    on the previous worker (worker 0 then computes parts of executions 2 and 5)."""
    n_base = LRQModelFile(lrq_file).hparams_dict["n_layer"]
    prompt = " ".join([PROMPT] * LONG_PROMPT_REPEAT)
    ts = ["-ts", ",".join(f"{s:g}" for s in SPLIT)]
    _, log, stats = _run_split(workers, lrq_file, N_SHORT, ts + ["--lrq-layers", MAP], ngl=n_base + 1, prompt=prompt)
    m = re.search(r"prompt eval time =\s*[0-9.]+ ms /\s*(\d+) tokens", log)
    assert m and int(m.group(1)) >= PINNED_BATCH, log[-2000:]
    assert check_split(lrq_file, workers, MAP_LAYERS, log, stats) == [], log[-3000:]


def test_split_check_fails_on_one_worker(workers, lrq_file):
    """(c) Control: -ts 1,0 puts every layer on worker 0, a real wrong split; the checks against the
    -ts 1,1 split find it."""
    _, log, stats = _run_split(workers, lrq_file, N_SHORT, ["-ts", "1,0"])
    problems = check_split(lrq_file, workers, _layers_of(lrq_file, []), log, stats)
    assert "worker 1 holds no weights" in problems, problems
    assert any(p.startswith("layer 2's weights on workers [0]") for p in problems), problems
    assert any(p.startswith("worker 0 computes executions") for p in problems), problems
    assert any("KV cache on" in p for p in problems), problems
