#!/usr/bin/env python3
"""Network traffic per decoded token of an LRQ model split across two ggml-rpc-server workers
(issue 20 item 4).  One machine: both workers and the client talk over loopback (127.0.0.1).

    flock /tmp/lrq-heavy.lock .venv/bin/python bench/rpc_split.py              # SmolLM2-135M
    flock /tmp/lrq-heavy.lock .venv/bin/python bench/rpc_split.py --json out/bench/rpc_split.json

The bundled SmolLM2-135M (30 layers) is converted to LRQ 2-bit g64 twice: ``--plan last-8``
(layers 22..29 twice, all on the second worker under -ts 1,1) and ``--plan all`` (every layer
twice, replicas on both workers).  Schedules run (`llama-completion --rpc A,B -ngl 99 -ts 1,1`):

* ``once``: the ``all`` file under the layer map 0..29 (no replication): the baseline;
* ``last-8``, ``all``: the files' own schedules (replicas right after their layer);
* ``last-8 separated``: the last-8 file under 0..29,22..29: the replicas run after the whole
  pass, but still all on worker 1;
* ``all, revisit``: the ``all`` file under the map 0..29,0..29: the whole pass twice, so the
  hidden state goes back from worker 1 to worker 0 in the middle of each token.

Each worker is reached through the counting relay of tests/rpc_tap.py, which decodes the RPC
requests.  Per token = (bytes of a -n N_LONG run - bytes of a -n N_SHORT run) / (N_LONG -
N_SHORT).  Predicted: the F32 hidden state (n_embd x 4 bytes) at each change of device (a
worker-to-worker hand-over passes through the client: read from one, written to the other), the
F32 logits (n_vocab x 4) back to the client and the graph inputs (tests/rpc_tap.py
predict_decode).  The rest of the measured bytes is RPC framing: each tensor write or read carries
a 296-byte tensor descriptor, and a graph that changed since that worker's last compute is sent
again whole (ggml-rpc keeps one graph per worker).  Every run's greedy text is compared with the
CPU-only run.  The two runs are repeated straight to the workers (no relay): decode tokens/s
from llama-completion's own timing there, with the load average (busy when above the core
count: the figure is then not a speed measurement), and the bytes of the loopback interface
(/proc/net/dev, received side) per token, a cross-check that counts TCP/IP headers and ACKs
too, and any other loopback traffic of the machine at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from lrq import assets, tools
from lrq.eval.speed import busy_cpu
from lrq.lrq_file import LRQModelFile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from rpc_tap import (GET_TENSOR_REQ, HEADER, SET_TENSOR_HEAD, RpcServerError, RpcTap, data_bytes,  # noqa: E402
                     exec_ids, layer_device, predict_decode, start_rpc_server)

PROMPT = "The history of the city begins"
SPLIT = [1.0, 1.0]
_EVAL = re.compile(r"common_perf_print:\s+eval time =\s*([0-9.]+) ms /\s*(\d+) runs")


def start_workers(threads: int):
    procs, taps = [], []
    for _ in range(2):
        try:
            p, port = start_rpc_server(threads, capture=False)
        except RpcServerError as e:
            raise SystemExit(str(e)) from None
        procs.append(p)
        taps.append(RpcTap(port))
    return procs, taps


def complete(model: Path, n: int, threads: int, extra: list[str]) -> tuple[str, str, float]:
    load = os.getloadavg()[0]
    proc = subprocess.run([str(tools.tool("llama-completion")), "-m", str(model), "-p", PROMPT, "-n", str(n),
                           "-no-cnv", "--temp", "0", "-t", str(threads), "-c", "2048", "--no-warmup", "-v", *extra],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"llama-completion {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr, max(load, os.getloadavg()[0])


def lo_bytes() -> int:
    """Bytes received on the loopback interface so far (each loopback packet is counted once as
    received), TCP/IP headers and acknowledgements included."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return -1


def run_split(taps, model, n, threads, extra, ports=None):
    """A run through the relays (ports None) or straight to the workers' own ports."""
    before = [t.snapshot() for t in taps]
    rpc = ",".join(f"127.0.0.1:{p}" for p in (ports or [t.port for t in taps]))
    text, log, load = complete(model, n, threads, ["--rpc", rpc, "-ngl", "99", "-ts", ",".join(f"{s:g}" for s in SPLIT), *extra])
    if not all(t.wait_idle() for t in taps):
        raise SystemExit("a relayed connection stayed open after the client exited")
    return text, log, load, [t.snapshot().minus(b) for t, b in zip(taps, before)]


def convert(src: Path, out: Path, plan: str, bits: int, group: int) -> Path:
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(REPO / ".venv/bin/lrq-convert"), str(src), str(out), "--bits", str(bits),
                        "--group-size", str(group), "--plan", plan], check=True)
    return out


def measure(name, model, layer_map, taps, args) -> dict:
    f = LRQModelFile(model)
    hp = f.hparams_dict
    n_base = hp["n_layer"]
    layers = ([int(x) for part in layer_map.split(",") for x in
               (range(int(part.split("..")[0]), int(part.split("..")[1]) + 1) if ".." in part else [part])]
              if layer_map else [e.layer for e in f.schedule])
    extra = ["--lrq-layers", layer_map] if layer_map else []
    _, _, _, short = run_split(taps, model, args.n_short, args.threads, extra)
    text, log, load, long = run_split(taps, model, args.n_long, args.threads, extra)
    text_cpu, _, _ = complete(model, args.n_long, args.threads, extra)
    # the same two runs straight to the workers: decode speed without the relay's extra hop, and
    # the loopback interface's own byte count as a cross-check of the relay's
    ports = [t.upstream[1] for t in taps]
    lo0 = lo_bytes()
    run_split(taps, model, args.n_short, args.threads, extra, ports)
    lo1 = lo_bytes()
    _, log_direct, load, _ = run_split(taps, model, args.n_long, args.threads, extra, ports)
    lo2 = lo_bytes()
    steps = args.n_long - args.n_short
    dev = [layer_device(L, n_base, SPLIT) for L in layers]
    out_dev = layer_device(n_base, n_base, SPLIT)
    want = predict_decode(dev, out_dev, hp["n_embd"], hp["n_vocab"])
    m = _EVAL.search(log_direct)
    per_worker = []
    for k in range(2):
        a, b = short[k], long[k]
        w, r = (y - x for x, y in zip(data_bytes(a), data_bytes(b)))
        cmds = {c: (b.cmd_count[c] - a.cmd_count[c]) / steps for c in b.cmd_count
                if b.cmd_count[c] != a.cmd_count[c]}
        per_worker.append({
            "executions": sorted(exec_ids(b.graph_nodes)),
            "executions_want": [e for e, d in enumerate(dev) if d == k],
            "weights_loaded_bytes": data_bytes(b, weights=True)[0],
            "to_worker_bytes_per_token": (b.c2s_bytes - a.c2s_bytes) / steps,
            "from_worker_bytes_per_token": (b.s2c_bytes - a.s2c_bytes) / steps,
            "tensor_data_to_worker_per_token": w / steps,
            "tensor_data_from_worker_per_token": r / steps,
            "predicted_to_worker": want.to_worker.get(k, 0),
            "predicted_from_worker": want.from_worker.get(k, 0),
            "requests_per_token": cmds,
            "graph_bytes_per_token": (b.cmd_bytes["GRAPH_COMPUTE"] - a.cmd_bytes["GRAPH_COMPUTE"]) / steps,
            "protocol_errors": b.protocol_errors,
        })
    hidden = 0
    path = [-1, *dev, out_dev]
    for x, y in zip(path, path[1:]):
        if x != y:
            hidden += 4 * hp["n_embd"] * (2 if x >= 0 else 1)
    return {
        "schedule": name, "file": model.name, "layer_map": layer_map, "n_exec": len(layers),
        "n_embd": hp["n_embd"], "n_vocab": hp["n_vocab"], "hand_overs": want.crossings,
        "predicted_hidden_bytes": hidden, "predicted_logit_bytes": 4 * hp["n_vocab"],
        "predicted_data_bytes": want.total, "workers": per_worker,
        "text_equal_cpu": text == text_cpu,
        "lo_bytes_per_token": ((lo2 - lo1) - (lo1 - lo0)) / steps,
        "decode_tok_s": (int(m.group(2)) / (float(m.group(1)) / 1000.0)) if m else None,
        "load1": load, "busy": busy_cpu(load),
    }


def table(rows) -> str:
    out = ["| schedule | executions (worker 0 / 1) | hand-overs per token | predicted: hidden state + logits + "
           "inputs = tensor data (B/token) | measured tensor data (B/token) | measured all bytes, both directions "
           "(B/token) | of which graph re-sends | lo interface (B/token) | text = CPU | decode tok/s (load) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["workers"]
        data = sum(x["tensor_data_to_worker_per_token"] + x["tensor_data_from_worker_per_token"] for x in w)
        allb = sum(x["to_worker_bytes_per_token"] + x["from_worker_bytes_per_token"] for x in w)
        graph = sum(x["graph_bytes_per_token"] for x in w)
        inputs = r["predicted_data_bytes"] - r["predicted_hidden_bytes"] - r["predicted_logit_bytes"]
        tok = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        out.append(f"| {r['schedule']} | {len(w[0]['executions'])} / {len(w[1]['executions'])} | {r['hand_overs']} | "
                   f"{r['predicted_hidden_bytes']:,} + {r['predicted_logit_bytes']:,} + {inputs:,} = "
                   f"{r['predicted_data_bytes']:,} | {data:,.0f} | {allb:,.0f} | {graph:,.0f} | {r['lo_bytes_per_token']:,.0f} | "
                   f"{'yes' if r['text_equal_cpu'] else 'NO'} | {tok} ({r['load1']:.1f}{', busy' if r['busy'] else ''}) |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="asset name or GGUF path (default smollm2-135m)")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--work-dir", type=Path, default=REPO / "out" / "rpc_split")
    ap.add_argument("--n-short", type=int, default=8)
    ap.add_argument("--n-long", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="threads of the client and of each worker")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    src = Path(args.model) if Path(args.model).is_file() else assets.path(args.model)
    stem = src.stem.split(".")[0]
    files = {p: convert(src, args.work_dir / f"{stem}-lrq{args.bits}-{p}.gguf", p, args.bits, args.group_size)
             for p in ("last-8", "all")}
    n_base = LRQModelFile(files["all"]).hparams_dict["n_layer"]
    once = f"0..{n_base - 1}"
    last = f"{n_base - 8}..{n_base - 1}"
    configs = [("once", files["all"], once), ("last-8", files["last-8"], ""),
               ("last-8 separated", files["last-8"], f"{once},{last}"), ("all", files["all"], ""),
               ("all, revisit", files["all"], f"{once},{once}")]
    procs, taps = start_workers(args.threads)
    rows = []
    try:
        for name, model, layer_map in configs:
            rows.append(measure(name, model, layer_map, taps, args))
            print(f"{name}: done", file=sys.stderr)
    finally:
        for t in taps:
            t.close()
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    print(f"loopback 127.0.0.1, one machine ({os.cpu_count()} cores); per token over "
          f"{args.n_long - args.n_short} decode steps (-n {args.n_short} vs -n {args.n_long}); "
          f"framing per request: {HEADER}-byte header, tensor write {SET_TENSOR_HEAD} + data, "
          f"tensor read {GET_TENSOR_REQ} + 8 + data")
    print(table(rows))
    for r in rows:
        for k, w in enumerate(r["workers"]):
            ok = w["executions"] == w["executions_want"]
            print(f"  {r['schedule']}: worker {k}: weights {w['weights_loaded_bytes'] / 2**20:.1f} MiB, executions "
                  f"{'as' if ok else 'NOT as'} the rule, requests/token {w['requests_per_token']}"
                  + (f", protocol errors {w['protocol_errors'][:2]}" if w["protocol_errors"] else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
