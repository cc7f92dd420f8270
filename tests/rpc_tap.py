"""A counting TCP relay in front of one ggml-rpc-server: what crosses the wire, command by command.

llama.cpp's RPC client talks to a worker over one TCP stream per connection; each request is
``| cmd (1 byte) | size (8 bytes, little-endian) | payload (size bytes) |`` (ggml-rpc.cpp,
``send_rpc_cmd``).  The relay forwards both directions unchanged and, on the client-to-server
side, decodes the request headers, so a test or a bench can read, per worker:

- the bytes in each direction (application bytes: TCP/IP headers are not counted);
- per command: how many requests and how many bytes;
- SET_TENSOR: the tensor name and the number of data bytes written (weights at load time,
  activations and graph inputs at run time);
- GRAPH_COMPUTE: the names of the graph's nodes (``attn_norm-4``: execution 4), i.e. which
  executions that worker computes.

The relay is independent of llama.cpp's own log: it sees the bytes, not what llama.cpp says it
did.  Requests whose size does not fit the packed structures below are counted as protocol
errors (a changed RPC protocol shows up there instead of as wrong names).

    >>> tap = RpcTap(upstream_port=50052)          # doctest: +SKIP
    >>> ... llama-completion --rpc 127.0.0.1:{tap.port} ...
    >>> tap.snapshot().c2s_bytes
"""

from __future__ import annotations

import bisect
import copy
import socket
import struct
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

SERVER_START_S = 30      # an rpc-server that does not listen within this is reported as failed


class RpcServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rpc_server(threads: int | None = None, capture: bool = True):
    """Start ``ggml-rpc-server`` on a free loopback port and wait until it listens: (process,
    port).  RpcServerError (with the server's output when captured) if it exits or stays silent."""
    import subprocess
    import time

    from lrq import tools
    port = free_port()
    cmd = [str(tools.tool("rpc-server")), "-H", "127.0.0.1", "-p", str(port)]
    if threads is not None:
        cmd += ["-t", str(threads)]
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if capture else subprocess.DEVNULL,
                            text=True)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RpcServerError(f"rpc-server exited with {proc.returncode}: "
                                 f"{proc.stdout.read() if capture else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RpcServerError(f"rpc-server did not listen on 127.0.0.1:{port} within {SERVER_START_S} s")


# ggml-rpc.cpp's command numbers (enum rpc_cmd; RPC protocol 7.0 of the pinned llama.cpp)
CMD_NAMES = ("ALLOC_BUFFER", "GET_ALIGNMENT", "GET_MAX_SIZE", "BUFFER_GET_BASE", "FREE_BUFFER",
             "BUFFER_CLEAR", "SET_TENSOR", "SET_TENSOR_HASH", "GET_TENSOR", "COPY_TENSOR",
             "GRAPH_COMPUTE", "GET_DEVICE_MEMORY", "INIT_TENSOR", "GET_ALLOC_SIZE", "HELLO",
             "DEVICE_COUNT", "GRAPH_RECOMPUTE", "MEMSET_TENSOR")
CMD = {n: i for i, n in enumerate(CMD_NAMES)}
HEADER = 9   # cmd byte + uint64 size

# struct rpc_tensor (#pragma pack(1)) with ggml's GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
# GGML_MAX_SRC 10, GGML_MAX_NAME 64: id u64, type u32, buffer u64, ne u32[4], nb u32[4], op u32,
# op_params i32[16], flags i32, src u64[10], view_src u64, view_offs u64, data u64, name char[64],
# use_count i32
RPC_TENSOR_SIZE = 296
_NAME_OFF, _NAME_LEN = 228, 64
# SET_TENSOR payload: rpc_tensor | cache_flag u8 | offset u64 | data
SET_TENSOR_HEAD = RPC_TENSOR_SIZE + 1 + 8
# GET_TENSOR payload: rpc_tensor | offset u64 | size u64
GET_TENSOR_REQ = RPC_TENSOR_SIZE + 16

_RECV = 1 << 20


def _name(t: bytes | memoryview) -> str:
    raw = bytes(t[_NAME_OFF:_NAME_OFF + _NAME_LEN])
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass
class TapStats:
    """What one worker received and sent (cumulative since the relay started or was reset)."""
    c2s_bytes: int = 0                                   # client -> server, all requests
    s2c_bytes: int = 0                                   # server -> client, all responses
    cmd_count: Counter = field(default_factory=Counter)  # requests per command name
    cmd_bytes: Counter = field(default_factory=Counter)  # client -> server bytes per command
    set_tensor: Counter = field(default_factory=Counter)  # tensor name -> data bytes written
    get_tensor: Counter = field(default_factory=Counter)  # tensor name -> bytes requested back
    graph_nodes: Counter = field(default_factory=Counter)  # node name -> GRAPH_COMPUTEs holding it
    alloc_bytes: int = 0                                 # sizes asked by ALLOC_BUFFER
    connections: int = 0
    protocol_errors: list = field(default_factory=list)

    def minus(self, other: "TapStats") -> "TapStats":
        """Counters of self less other: what happened between the two snapshots."""
        return TapStats(self.c2s_bytes - other.c2s_bytes, self.s2c_bytes - other.s2c_bytes,
                        self.cmd_count - other.cmd_count, self.cmd_bytes - other.cmd_bytes,
                        self.set_tensor - other.set_tensor, self.get_tensor - other.get_tensor,
                        self.graph_nodes - other.graph_nodes, self.alloc_bytes - other.alloc_bytes,
                        self.connections - other.connections,
                        self.protocol_errors[len(other.protocol_errors):])


class _RequestParser:
    """Incremental decoder of the client-to-server stream (headers + the parts of payloads read)."""

    def __init__(self, stats: TapStats, lock: threading.Lock):
        self.stats, self.lock = stats, lock
        self.hdr = bytearray()
        self.cmd = -1
        self.size = 0
        self.left = 0
        self.keep = bytearray()
        self.keep_max = 0

    def feed(self, data: bytes) -> None:
        mv = memoryview(data)
        i, n = 0, len(mv)
        while i < n:
            if self.cmd < 0:
                take = min(HEADER - len(self.hdr), n - i)
                self.hdr += mv[i:i + take]
                i += take
                if len(self.hdr) == HEADER:
                    self.cmd = self.hdr[0]
                    self.size = self.left = struct.unpack_from("<Q", self.hdr, 1)[0]
                    self.hdr.clear()
                    self.keep.clear()
                    name = CMD_NAMES[self.cmd] if self.cmd < len(CMD_NAMES) else ""
                    self.keep_max = (self.size if name == "GRAPH_COMPUTE" else
                                     SET_TENSOR_HEAD if name == "SET_TENSOR" else
                                     GET_TENSOR_REQ if name == "GET_TENSOR" else min(self.size, 64))
                    if self.left == 0:
                        self._done()
                continue
            take = min(self.left, n - i)
            room = self.keep_max - len(self.keep)
            if room > 0:
                self.keep += mv[i:i + min(take, room)]
            self.left -= take
            i += take
            if self.left == 0:
                self._done()

    def _done(self) -> None:
        cmd, size, p = self.cmd, self.size, self.keep
        name = CMD_NAMES[cmd] if cmd < len(CMD_NAMES) else f"CMD{cmd}"
        self.cmd = -1
        with self.lock:
            st = self.stats
            st.cmd_count[name] += 1
            st.cmd_bytes[name] += HEADER + size
            try:
                if name == "SET_TENSOR":
                    if size < SET_TENSOR_HEAD:
                        raise ValueError(f"SET_TENSOR of {size} bytes < {SET_TENSOR_HEAD}")
                    st.set_tensor[_name(p)] += size - SET_TENSOR_HEAD
                elif name == "GET_TENSOR":
                    if size != GET_TENSOR_REQ:
                        raise ValueError(f"GET_TENSOR request of {size} bytes != {GET_TENSOR_REQ}")
                    st.get_tensor[_name(p)] += struct.unpack_from("<Q", p, RPC_TENSOR_SIZE + 8)[0]
                elif name == "ALLOC_BUFFER":
                    st.alloc_bytes += struct.unpack_from("<IQ", p)[1]
                elif name == "GRAPH_COMPUTE":
                    st.graph_nodes.update(_graph_node_names(bytes(p)))
            except (ValueError, struct.error, IndexError) as e:
                st.protocol_errors.append(f"{name}: {e}")


def _graph_node_names(p: bytes) -> set[str]:
    """| device u32 | n_nodes u32 | node ids u64[n_nodes] | n_tensors u32 | rpc_tensor[n_tensors] |"""
    _, n_nodes = struct.unpack_from("<II", p, 0)
    ids = struct.unpack_from(f"<{n_nodes}Q", p, 8)
    off = 8 + 8 * n_nodes
    (n_tensors,) = struct.unpack_from("<I", p, off)
    off += 4
    if len(p) != off + n_tensors * RPC_TENSOR_SIZE:
        raise ValueError(f"graph of {len(p)} bytes does not hold {n_nodes} nodes and {n_tensors} tensors")
    by_id = {}
    for k in range(n_tensors):
        t = memoryview(p)[off + k * RPC_TENSOR_SIZE: off + (k + 1) * RPC_TENSOR_SIZE]
        by_id[struct.unpack_from("<Q", t, 0)[0]] = _name(t)
    return {by_id.get(i, f"?{i}") for i in ids}


class RpcTap:
    """Listens on 127.0.0.1:<port> and relays every connection to 127.0.0.1:<upstream_port>."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._stats = TapStats()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(8)
        self.port = self._srv.getsockname()[1]
        self._closed = False
        self._active = 0                       # relay threads still forwarding
        self._idle = threading.Condition(self._lock)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def snapshot(self) -> TapStats:
        with self._lock:
            return copy.deepcopy(self._stats)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every relayed connection has closed (after the client exited, its last
        bytes are counted once both directions have seen end-of-stream)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def close(self) -> None:
        self._closed = True
        try:
            self._srv.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._stats.connections += 1
                self._active += 2
            parser = _RequestParser(self._stats, self._lock)
            left = [2]                          # pumps of this connection still running
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up, parser, left), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, parser: _RequestParser,
              left: list) -> None:
        try:
            while True:
                data = src.recv(_RECV)
                if not data:
                    break
                if up:
                    parser.feed(data)
                    with self._lock:
                        self._stats.c2s_bytes += len(data)
                else:
                    with self._lock:
                        self._stats.s2c_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass
            with self._idle:
                left[0] -= 1
                if left[0] == 0:             # both directions done: release the sockets
                    src.close()
                    dst.close()
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()


def exec_ids(node_names) -> set[int]:
    """Executions (the il of llama.cpp's per-layer node names 'name-<il>') in a set of node names."""
    out = set()
    for n in node_names:
        head, _, tail = n.rpartition("-")
        if head and tail.isdigit() and not n.startswith(("leaf_", "node_")):
            out.add(int(tail))
    return out


# ---- the layer split of llama.cpp and what a decode step must move --------------------------------

def layer_device(il: int, n_layer: int, tensor_split: list[float], n_gpu_layers: int = 99) -> int:
    """Index (in --rpc order) of the device llama.cpp gives base layer il (il == n_layer: the output
    head), or -1 for the CPU; llama_model::load_tensors' rule restated: the last n_gpu_layers of
    the n_layer + 1 "layers" are offloaded, split at the cumulative shares of -ts."""
    n_act = min(n_gpu_layers, n_layer + 1)
    start = max(n_layer + 1 - n_gpu_layers, 0)
    if il < start or il - start >= n_act:
        return -1
    total = sum(tensor_split)
    cum, acc = [], 0.0
    for s in tensor_split:
        acc += s
        cum.append(acc / total)
    return bisect.bisect_right(cum, (il - start) / n_act)


@dataclass(frozen=True)
class DecodeTraffic:
    """Tensor data a one-token decode step moves between the client and each worker (bytes)."""
    to_worker: dict          # worker -> bytes written (SET_TENSOR data)
    from_worker: dict        # worker -> bytes read back (GET_TENSOR data)
    crossings: int           # hidden-state hand-overs between devices (CPU -> worker included)

    @property
    def total(self) -> int:
        return sum(self.to_worker.values()) + sum(self.from_worker.values())


# Graph inputs every worker that runs attention receives per decoded token (llama.cpp's
# llm_graph_input_*): position i32, K and V cache row indices i64, and the f16 KQ mask row over
# the cache cells in use, rounded up to KQ_MASK_CELLS (true while prompt + output < 256 tokens)
KQ_MASK_CELLS = 256
ATTN_INPUT_BYTES = 4 + 8 + 8 + 2 * KQ_MASK_CELLS
OUT_IDS_BYTES = 4          # the output row index, to the worker holding the output head


def predict_decode(exec_dev: list[int], out_dev: int, n_embd: int, n_vocab: int) -> DecodeTraffic:
    """What one decode step must move if every execution runs on exec_dev[e] and the output head
    on out_dev: the F32 hidden state (n_embd x 4 bytes) at each change of device along
    CPU (embeddings) -> executions -> output head, the F32 logits (n_vocab x 4) back to the
    client, and the graph inputs.  ggml-rpc has no worker-to-worker copy: a hand-over from
    worker a to worker b is read from a by the client and written to b (twice on the network)."""
    to_w: dict[int, int] = defaultdict(int)
    from_w: dict[int, int] = defaultdict(int)
    path = [-1, *exec_dev, out_dev]
    crossings = 0
    for a, b in zip(path, path[1:]):
        if a != b:
            crossings += 1
            if a >= 0:
                from_w[a] += 4 * n_embd
            to_w[b] += 4 * n_embd
    for d in set(exec_dev):
        to_w[d] += ATTN_INPUT_BYTES
    to_w[out_dev] += OUT_IDS_BYTES
    from_w[out_dev] += 4 * n_vocab
    return DecodeTraffic(dict(to_w), dict(from_w), crossings)


def data_bytes(st: TapStats, weights: bool = False) -> tuple[int, int]:
    """(written, read back) tensor data of a snapshot difference; weights (names blk.*, token_embd.*,
    output*) only when asked, run-time tensors (activations, graph inputs) otherwise."""
    def is_weight(n: str) -> bool:
        return n.startswith(("blk.", "token_embd.", "output"))
    w = sum(v for n, v in st.set_tensor.items() if is_weight(n) == weights)
    r = sum(v for n, v in st.get_tensor.items() if is_weight(n) == weights)
    return w, r
