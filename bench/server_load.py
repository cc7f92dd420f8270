"""llama-server under load: many concurrent greedy chat completions against solo answers.

Example (docs/RESULTS.md "Server under load"):
    .venv/bin/python bench/server_load.py --models lrq2=lrq2-g64-last8.gguf,iq2xs=SmolLM2.IQ2_XS.imat.gguf \\
        --requests 200 --clients 16 --slots 4 --threads 1 --baseline iq2xs --out out/server-load.md
    .venv/bin/python bench/server_load.py --models smollm2-135m --requests 40 --clients 8 --no-cache-prompt

For each model (a path, a bundled model name such as smollm2-135m, or LABEL=PATH) the script
starts the patched llama-server on a free port of 127.0.0.1 (`-np SLOTS -c SLOTS*CTX`, CPU
threads `-t THREADS`, one HTTP thread per client), waits for /health, and then

  1. solo: sends each of the distinct prompts alone, one after the other, twice, and keeps the
     greedy answer (temperature 0, fixed seed, MAX_TOKENS tokens); the two solo passes must agree
     (else the server is not deterministic even without concurrency: reported as "solo unstable");
  2. load: sends REQUESTS requests (the prompts in a fixed shuffled order, each prompt about
     REQUESTS/PROMPTS times) from CLIENTS concurrent clients, and compares every answer with the
     solo answer of its prompt ("mismatches"; with --probs N also the top-N probabilities of
     every generated token, bit for bit: "probability mismatches").

Every request has its own timeout; the load phase has a wall-clock limit after which the
remaining requests are not sent (counted as errors).  The server is stopped in a finally block.
Traffic goes to 127.0.0.1 only.

The server's prompt cache is on by default (as in llama-server): a prompt seen before is not
evaluated again except for its last token, so that token goes through the matmuls in a batch of
another size than the first time.  ggml's stock CPU matmuls are not bit-for-bit independent of
the batch size (the pinned server's README says so for cache_prompt), LRQ's op is: stock-typed
files can then give other greedy answers to a repeated prompt, alone or under load.
--no-cache-prompt sends cache_prompt=false, which separates that effect from concurrency.

Printed per model: requests, errors, mismatches vs solo, p50 / p95 / max latency of the load
phase, mean completion tokens per answer (latencies of models whose answers stop early are not
comparable), completion tokens/s over the load phase's wall time, the server's CPU share (CPU seconds
/ (wall x threads): below ~0.8 the server did not get its cores), and the 1-minute load average
before and after the load phase.  A run is marked "busy" when either load average exceeds the
core count (more runnable threads than cores, the server's own included); a busy run's speed is
never used for a ratio.  --baseline LABEL adds tokens/s and p50 relative to that model's row.
The first mismatching answers (prompt, solo text, load text) are printed in full.  Exit status:
0 when every request of every model succeeded and matched its solo answer, 3 otherwise, 1 when a
server did not start, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"          # the only address this script talks to

# Short chat messages; distinct first words so that prompt-cache reuse between prompts is small.
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Write one sentence about the sea.",
    "Which planet is closest to the sun?",
    "Translate 'good morning' into Spanish.",
    "Explain what a prime number is.",
    "Suggest a name for a black cat.",
    "Why is the sky blue?",
    "List two fruits that are yellow.",
    "Describe a rainy day in five words.",
    "Who wrote Romeo and Juliet?",
    "Tell me a fun fact about elephants.",
    "Recommend a good book for children.",
    "Convert 10 kilometers to miles.",
    "Finish this sentence: the early bird",
    "Can you name a famous painter?",
    "Summarize the water cycle briefly.",
    "Invent a title for a mystery novel.",
]

ROUTES = ("chat", "completion")


class LoadError(RuntimeError):
    """The server could not be started, or a model argument is wrong."""


# ---- the server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc (None where /proc is not available)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Server:
    """llama-server on a free port of 127.0.0.1; its log goes to a file (a pipe nobody reads
    would fill up and block the server).  Use as a context manager: stopped on exit."""

    def __init__(self, model: Path, *, slots: int, ctx: int, threads: int, http_threads: int,
                 extra: list[str] | None = None, log_dir: Path | None = None,
                 start_timeout: float = 180.0):
        from lrq import tools
        self.model = Path(model)
        if not self.model.is_file():
            raise LoadError(f"{self.model}: no such model file")
        self.port = free_port()
        self.start_timeout = start_timeout
        self.cmd = [str(tools.tool("llama-server")), "-m", str(self.model), "--host", HOST,
                    "--port", str(self.port), "-np", str(slots), "-c", str(slots * ctx),
                    "-t", str(threads), "--threads-http", str(http_threads), "--no-webui",
                    *(extra or [])]
        self._log_dir = log_dir
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        d = self._log_dir or Path(tempfile.mkdtemp(prefix="lrq-server-"))
        d.mkdir(parents=True, exist_ok=True)
        self.log_path = d / f"llama-server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:                     # /health answers 200 once the model is loaded
            if self.proc.poll() is not None:
                raise LoadError(f"llama-server exited with {self.proc.returncode} while loading "
                                f"{self.model}:\n{self.log_tail()}")
            try:
                status, _ = request(self.port, "GET", "/health", None, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LoadError(f"llama-server did not become healthy within {self.start_timeout:.0f} s "
                                f"({self.model}):\n{self.log_tail()}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        return _cpu_seconds(self.proc.pid) if self.proc else None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if getattr(self, "_log", None):
            self._log.close()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- requests -----------------------------------------------------------------------------------

def request(port: int, method: str, route: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection to 127.0.0.1 (no keep-alive: a client never holds
    one of the server's HTTP threads between requests)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, route, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Req:
    """What every request of a run asks for.  Greedy: temperature 0 (llama-server takes the
    arg-max), a fixed seed for good measure.  cache_prompt False makes the server evaluate the
    whole prompt again (no reuse of a slot's KV cache), so that prompts of several requests share
    a batch.  n_probs > 0 also asks for the top-n probabilities of every generated token, kept
    as text in Answer.probs so that two answers can be compared bit for bit."""
    route: str = "chat"
    max_tokens: int = 32
    seed: int = 42
    timeout: float = 300.0      # seconds per request
    cache_prompt: bool = True
    n_probs: int = 0

    def body(self, prompt: str) -> tuple[str, bytes]:
        common = {"temperature": 0, "seed": self.seed, "stream": False, "cache_prompt": self.cache_prompt}
        if self.route == "chat":
            if self.n_probs:
                common.update(logprobs=True, top_logprobs=self.n_probs)
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens, **common}
            return "/v1/chat/completions", json.dumps(body).encode()
        if self.n_probs:
            common["n_probs"] = self.n_probs
        return "/completion", json.dumps({"prompt": prompt, "n_predict": self.max_tokens, **common}).encode()


@dataclass
class Answer:
    prompt: int
    ok: bool
    latency: float
    text: str = ""
    tokens: int = 0
    error: str = ""
    probs: str = ""


def parse_answer(route: str, status: int, raw: bytes) -> tuple[str, int, str]:
    """(text, completion tokens, probabilities as JSON text or "") of a 200 answer; ValueError
    naming what is missing otherwise."""
    if status != 200:
        raise ValueError(f"HTTP {status}: {raw[:200].decode(errors='replace')}")
    d = json.loads(raw)
    if route == "chat":
        try:
            c = d["choices"][0]
            probs = c.get("logprobs")
            return c["message"]["content"], int(d["usage"]["completion_tokens"]), json.dumps(probs) if probs else ""
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"chat answer without choices[0].message.content / usage: {e!r}") from None
    try:
        probs = d.get("completion_probabilities")
        return d["content"], int(d["tokens_predicted"]), json.dumps(probs) if probs else ""
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"completion answer without content / tokens_predicted: {e!r}") from None


def ask(port: int, req: Req, prompts: list[str], i: int) -> Answer:
    path, body = req.body(prompts[i])
    t0 = time.monotonic()
    try:
        status, raw = request(port, "POST", path, body, req.timeout)
        text, n, probs = parse_answer(req.route, status, raw)
        return Answer(i, True, time.monotonic() - t0, text, n, probs=probs)
    except (OSError, ValueError, http.client.HTTPException) as e:
        return Answer(i, False, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")


def solo_answers(port: int, req: Req, prompts: list[str]) -> list[Answer]:
    """Each prompt alone, one after the other (len(prompts) requests)."""
    return [ask(port, req, prompts, i) for i in range(len(prompts))]


def load_answers(port: int, req: Req, prompts: list[str], order: list[int], clients: int,
                 time_limit: float) -> tuple[list[Answer], float]:
    """len(order) requests from `clients` threads; requests not started before the time limit
    are not sent and count as errors (so the phase ends by time_limit + req.timeout).  Returns
    the answers (in order) and the wall time."""
    t0 = time.monotonic()
    deadline = t0 + time_limit

    def one(i: int) -> Answer:
        if time.monotonic() >= deadline:
            return Answer(i, False, 0.0, error=f"not sent: the {time_limit:.0f} s time limit had passed")
        return ask(port, req, prompts, i)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(one, order))
    return answers, time.monotonic() - t0


# ---- one model ----------------------------------------------------------------------------------

@dataclass
class LoadRun:
    label: str
    path: Path
    requests: int = 0
    errors: int = 0
    mismatches: int = 0
    prob_mismatches: int = 0    # with --probs: answers whose probabilities differ from solo's
    solo_errors: int = 0
    solo_unstable: int = 0
    solo_distinct: int = 0      # distinct solo answers: a model that answers every prompt alike
                                # would hide a mix-up of sequences from the comparison
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    cpu_share: float | None = None
    load_before: float = 0.0
    load_after: float = 0.0
    busy: bool = False
    alive_after: bool = True
    examples: list[dict] = field(default_factory=list)
    solo_texts: list = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        s = sorted(self.latencies)
        return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def run_model(label: str, path: Path, args, log=print) -> LoadRun:
    cores = os.cpu_count() or 1
    prompts = PROMPTS[: args.prompts]
    rng = random.Random(args.seed)
    order = [i % len(prompts) for i in range(args.requests)]
    rng.shuffle(order)
    out = LoadRun(label, path, requests=args.requests)
    with Server(path, slots=args.slots, ctx=args.ctx, threads=args.threads,
                http_threads=args.clients + 2, log_dir=args.log_dir, extra=shlex.split(args.server_args),
                start_timeout=args.start_timeout) as srv:
        log(f"{label}: llama-server on {HOST}:{srv.port} (log {srv.log_path})", flush=True)
        req = Req(args.route, args.max_tokens, args.seed, args.timeout, not args.no_cache_prompt,
                  args.probs)
        solo = solo_answers(srv.port, req, prompts)
        again = solo_answers(srv.port, req, prompts)
        out.solo_errors = sum(not a.ok for a in solo + again)
        out.solo_unstable = sum(a.ok and b.ok and a.text != b.text for a, b in zip(solo, again))
        out.solo_distinct = len({a.text for a in solo if a.ok})
        out.solo_texts = [a.text if a.ok else None for a in solo]
        for a in solo + again:
            if not a.ok and len(out.error_examples) < 5:
                out.error_examples.append(f"solo '{prompts[a.prompt]}': {a.error}")
        out.load_before = os.getloadavg()[0]
        cpu0 = srv.cpu_seconds()
        answers, out.wall = load_answers(srv.port, req, prompts, order, args.clients, args.time_limit)
        cpu1 = srv.cpu_seconds()
        out.load_after = os.getloadavg()[0]
        out.alive_after = srv.alive()
        if cpu0 is not None and cpu1 is not None and out.wall > 0:
            out.cpu_share = (cpu1 - cpu0) / (out.wall * args.threads)
        for a in answers:
            if not a.ok:
                out.errors += 1
                if len(out.error_examples) < 5:
                    out.error_examples.append(f"load '{prompts[a.prompt]}': {a.error}")
                continue
            out.latencies.append(a.latency)
            out.tokens += a.tokens
            ref = solo[a.prompt]
            if args.probs and (not ref.ok or a.probs != ref.probs):
                out.prob_mismatches += 1
            if not ref.ok or a.text != ref.text:
                out.mismatches += 1
                if len(out.examples) < args.show:
                    out.examples.append({"prompt": prompts[a.prompt], "solo": ref.text if ref.ok else None,
                                         "load": a.text})
        if out.errors and not out.alive_after:
            out.error_examples.append(f"llama-server exited during the load:\n{srv.log_tail()}")
    out.busy = max(out.load_before, out.load_after) > cores
    return out


# ---- report -------------------------------------------------------------------------------------

def table(runs: list[LoadRun], args, baseline: str | None) -> str:
    cores = os.cpu_count() or 1
    base = next((r for r in runs if r.label == baseline), None)
    head = ["model", "requests", "errors", "mismatches vs solo"] + (["probability mismatches"] if args.probs else []) + [
            "distinct solo answers", "p50 s", "p95 s", "max s",
            "tokens / answer", "completion tok/s", "server CPU share", "load 1m before / after", "busy"]
    if base is not None:
        head += [f"tok/s vs {base.label}", f"p50 vs {base.label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        mism = f"{r.mismatches}" + (f" (solo unstable: {r.solo_unstable})" if r.solo_unstable else "")
        cells = [r.label, str(r.requests), str(r.errors), mism] + ([str(r.prob_mismatches)] if args.probs else []) + [
                 f"{r.solo_distinct} / {len(PROMPTS[: args.prompts])}",
                 f"{r.pct(0.5):.2f}", f"{r.pct(0.95):.2f}",
                 f"{max(r.latencies, default=float('nan')):.2f}",
                 f"{r.tokens / len(r.latencies):.1f}" if r.latencies else "n/a", f"{r.tps:.1f}",
                 "n/a" if r.cpu_share is None else f"{r.cpu_share:.2f}",
                 f"{r.load_before:.2f} / {r.load_after:.2f}", "busy" if r.busy else "no"]
        if base is not None:
            if r.busy or base.busy or not base.tps or not r.latencies or not base.latencies:
                cells += ["(busy)" if (r.busy or base.busy) else "n/a"] * 2
            else:
                cells += [f"{r.tps / base.tps:.2f}", f"{r.pct(0.5) / base.pct(0.5):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    proto = (f"{args.requests} requests ({args.route}, {len(PROMPTS[: args.prompts])} distinct prompts, greedy, "
             f"{args.max_tokens} tokens, cache_prompt {'off' if args.no_cache_prompt else 'on'}) "
             f"from {args.clients} clients; llama-server -np {args.slots} "
             f"-c {args.slots * args.ctx} -t {args.threads}{' ' + args.server_args if args.server_args else ''}; "
             f"{cores} cores; busy = 1-min load average above {cores} before or after the load phase")
    return "\n".join(lines) + "\n\n" + proto + "\n"


def resolve_models(spec: str) -> list[tuple[str, Path]]:
    from lrq import assets
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        label, _, p = item.rpartition("=")
        if p in assets.ASSETS:
            path = assets.path(p)
        else:
            path = Path(p)
        if not path.is_file():
            raise LoadError(f"--models: '{p}' is neither a bundled model name nor a file")
        out.append((label or path.name.removesuffix(".gguf"), path))
    labels = [l for l, _ in out]
    if len(set(labels)) != len(labels):
        raise LoadError(f"--models: labels must be distinct (got {', '.join(labels)}); use LABEL=PATH")
    return out


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True,
                    help="comma-separated model files, bundled model names, or LABEL=PATH")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4, help="llama-server -np")
    ap.add_argument("--ctx", type=int, default=512, help="context per slot (-c is SLOTS x CTX)")
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"distinct prompts (at most {len(PROMPTS)})")
    ap.add_argument("--route", choices=ROUTES, default="chat",
                    help="chat: /v1/chat/completions; completion: /completion (models without a chat template)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-cache-prompt", action="store_true",
                    help="send cache_prompt=false: every request evaluates its whole prompt (no KV reuse)")
    ap.add_argument("--probs", type=int, default=0, metavar="N",
                    help="also ask for the top-N probabilities of every token and count answers whose "
                         "probabilities differ from the solo answer's, bit for bit")
    ap.add_argument("--server-args", default="",
                    help="more llama-server arguments, written with '=': --server-args='-fa off --no-repack'")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--time-limit", type=float, default=1200.0, help="seconds for a model's load phase")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds for llama-server to load")
    ap.add_argument("--baseline", default=None, help="label of the row the ratios are relative to")
    ap.add_argument("--show", type=int, default=3, help="mismatching answers printed per model")
    ap.add_argument("--log-dir", type=Path, default=None, help="llama-server logs (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    for name in ("requests", "clients", "slots", "ctx", "threads", "max_tokens", "prompts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.prompts > len(PROMPTS):
        ap.error(f"--prompts: at most {len(PROMPTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models = resolve_models(args.models)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.baseline is not None and args.baseline not in [l for l, _ in models]:
        print(f"error: --baseline '{args.baseline}' is not one of the labels "
              f"({', '.join(l for l, _ in models)})", file=sys.stderr)
        return 2
    runs = []
    for label, path in models:
        try:
            runs.append(run_model(label, path, args))
        except LoadError as e:
            print(f"error: {label}: {e}", file=sys.stderr)
            return 1
        r = runs[-1]
        print(f"  {label}: {r.requests} requests, {r.errors} errors, {r.mismatches} mismatches, "
              f"p50 {r.pct(0.5):.2f} s, {r.tps:.1f} tok/s, wall {r.wall:.1f} s, load {r.load_before:.2f}"
              f" -> {r.load_after:.2f}", flush=True)
        for e in r.error_examples:
            print(f"    error: {e}")
        for ex in r.examples:
            print(f"    mismatch on {ex['prompt']!r}:\n      solo: {ex['solo']!r}\n      load: {ex['load']!r}")
    text = table(runs, args, args.baseline)
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        rows = [{"label": r.label, "path": str(r.path), "requests": r.requests, "errors": r.errors,
                 "mismatches": r.mismatches, "prob_mismatches": r.prob_mismatches,
                 "solo_unstable": r.solo_unstable, "solo_errors": r.solo_errors,
                 "solo_distinct": r.solo_distinct, "solo": r.solo_texts,
                 "p50": r.pct(0.5), "p95": r.pct(0.95), "max": max(r.latencies, default=None),
                 "tokens": r.tokens, "wall": r.wall, "tps": r.tps, "cpu_share": r.cpu_share,
                 "load_before": r.load_before, "load_after": r.load_after, "busy": r.busy,
                 "examples": r.examples, "error_examples": r.error_examples} for r in runs]
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    bad = sum(r.errors + r.solo_errors + r.mismatches for r in runs)
    return 0 if bad == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
