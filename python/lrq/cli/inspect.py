"""lrq-inspect: metadata, schedule, tensors and bits per weight of an LRQ GGUF or an adapter.

Examples:
    lrq-inspect out.lrq.gguf                 # summary, schedule, per-tensor table
    lrq-inspect out.lrq.gguf --json          # everything as one JSON object
    lrq-inspect out.lrq.gguf --no-tensors    # without the per-tensor table
    lrq-inspect smol.adapter.gguf            # an adapter: its base, schedule, replica tensors
    lrq-inspect smol.IQ2_XS.gguf --adapter smol.adapter.gguf   # base + adapter as one model
    lrq-inspect smol.IQ2_XS.gguf --layers 0..15,11..29         # a base with a layer map
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# arrays longer than this (tokenizer vocabularies) are summarised, not printed
MAX_ARRAY_SHOWN = 16


def _jsonable(v: Any) -> Any:
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    if hasattr(v, "item"):      # numpy scalar
        return v.item()
    return v


def _short(v: Any, full: bool) -> Any:
    if isinstance(v, list) and len(v) > MAX_ARRAY_SHOWN and not full:
        return {"array_length": len(v), "first": _jsonable(v[:4])}
    return _jsonable(v)


def collect_adapter(path: str) -> dict:
    """What lrq-inspect reports of an adapter file on its own (FORMAT.md 11), JSON-able."""
    from ..adapter import AdapterFile
    info = AdapterFile(path).summary()
    info["lrq_metadata"] = {k: _short(_jsonable(v), False) for k, v in info["lrq_metadata"].items()}
    info["warnings"] = []
    return info


def _is_adapter(path: str) -> bool:
    from ..constants import ADAPTER_ARCH
    from ..gguf_meta import GGUFMetaError, read_metadata
    try:
        return read_metadata(path).get("general.architecture") == ADAPTER_ARCH
    except (GGUFMetaError, OSError, ValueError):
        return False          # the full reader reports what is wrong with the file


def collect(path: str, full_metadata: bool = False, adapter: str | None = None,
            layers: str | None = None) -> dict:
    """Everything lrq-inspect reports, as plain JSON-able data (``adapter`` / ``layers``: the
    view of base ``path`` with that adapter or layer map)."""
    from ..constants import Keys
    from ..eval.bpw import layout_label
    from ..lrq_file import LRQModelFile

    if adapter is not None or layers is not None:
        from ..adapter import BoundModelFile
        f = BoundModelFile(path, adapter, layers)
    else:
        f = LRQModelFile(path)
    lrq_keys = {k: _jsonable(v) for k, v in f.kv.items() if k.startswith("lrq.")}
    other = {k: _short(v, full_metadata) for k, v in f.kv.items() if not k.startswith("lrq.")}
    tensors = []
    for name in f.tensor_names:
        ti = f.tensor_info(name)
        tensors.append({"name": name, "type": ti.type_name, "type_id": ti.type_id,
                        "shape": list(ti.shape), "bytes": ti.nbytes})
    bpw = f.bpw()
    # low-rank corrections (FORMAT.md 6.2): one lr_v [rank, n_in] per corrected (linear, replica)
    lr = [t for t in tensors if t["name"].endswith(".lr_v")]
    lr_u = [t for t in tensors if t["name"].endswith(".lr_u")]
    lowrank = {"n": len(lr), "ranks": sorted({t["shape"][0] if len(t["shape"]) == 2 else 1 for t in lr}),
               "types": sorted({t["type"] for t in lr + lr_u})}
    return {
        "file": str(f.path),
        "experts": _experts(f, tensors),
        "format_version": f.format_version,
        "architecture": f.kv.get("general.architecture"),
        "base_architecture": f.arch,
        "hparams": f.hparams_dict,
        "quant": {"mode": f.mode, "group_size": f.group_size, "bits": f.kv.get(Keys.BITS),
                  "scale_search": f.kv.get(Keys.SCALE_SEARCH), "rounding": f.kv.get(Keys.ROUNDING),
                  "base_type": f.kv.get(Keys.BASE_TYPE), "base_imatrix": f.kv.get(Keys.BASE_IMATRIX),
                  "linear_types": sorted({f.tensor_type(n) for n in f.replicable_weights()})},
        "schedule": [{"layer": e.layer, "replica": e.replica, "group": e.group, "weight": e.weight}
                     for e in f.schedule],
        # the weights' layout(s): "LRQ2 two-level B16/S256 + LRQ3, LRQ4" (lrq.eval.bpw.layout_label)
        "layout": None if f.mode is None else layout_label(f),
        "schedule_summary": f.plan.describe(),
        "expert_entries": _expert_entries(f, tensors),
        "lowrank": lowrank,
        "bpw": {"lrq": bpw["lrq"], "linears": bpw["linears"], "file": bpw["file"],
                "lrq_recorded": f.kv.get(Keys.BPW_LRQ), "linears_recorded": f.kv.get(Keys.BPW_LINEARS)},
        "counts": {"tensors": len(tensors), "lrq_weights": len(f.lrq_weights()),
                   "n_lrq_weights": bpw["n_lrq_weights"], "n_base_params": bpw["n_base_params"],
                   "tensor_bytes": bpw["tensor_bytes"], "file_bytes": f.path.stat().st_size},
        "lrq_metadata": lrq_keys,
        "metadata": other,
        "tensors": tensors,
        "warnings": f.warnings,
        "adapter": None if adapter is None else str(adapter),
        "layer_map": layers,
    }


def _experts(f, tensors: list[dict]) -> dict | None:
    """Mixture of experts (docs/moe.md): expert counts and the types of the stacked experts,
    the routers and the shared experts; None for a dense model."""
    routers = [t for t in tensors if t["name"].endswith(".ffn_gate_inp.weight")]
    if not routers:
        return None
    exps = [t for t in tensors if t["name"].endswith("_exps.weight")]
    shexp = [t for t in tensors if "_shexp.weight" in t["name"] and "gate_inp" not in t["name"]]
    gates = [t for t in tensors if t["name"].endswith(".ffn_gate_inp_shexp.weight")]
    return {"n_expert": f.kv.get(f"{f.arch}.expert_count"), "n_used": f.kv.get(f"{f.arch}.expert_used_count"),
            "n_moe_layers": len(routers), "expert_types": sorted({t["type"] for t in exps}),
            "router_types": sorted({t["type"] for t in routers + gates}),
            "shared_expert_types": sorted({t["type"] for t in shexp})}


def _expert_entries(f, tensors: list[dict]) -> list[dict]:
    """Expert-level replication entries (format v4, docs/moe.md) with the names of their
    per-expert tensors ("<proj>.<param>"); [] without entries."""
    names = {t["name"] for t in tensors}
    out = []
    for e in getattr(f, "expert_entries", ()):
        pre = f"blk.{e.layer}."
        mid = f".lrq_x{e.replica}."
        have = sorted(n[len(pre):].replace(mid, ".") for n in names
                      if n.startswith(pre) and mid in n)
        out.append({"layer": e.layer, "replica": e.replica, "experts": list(e.experts), "mode": e.mode,
                    "weight": e.weight, "tensors": have})
    return out


def _print_expert_entries(info: dict) -> None:
    entries = info.get("expert_entries") or []
    if not entries:
        return
    n_expert = (info.get("experts") or {}).get("n_expert")
    print(f"expert replicas: {len(entries)} entries (format v{info['format_version']})")
    for e in entries:
        params = [p for p in ("gain", "bias") if any(t.endswith("." + p) for t in e["tensors"])]
        projs = [p for p in ("gate", "up", "down") if any(t.startswith(f"ffn_{p}_exps.") for t in e["tensors"])]
        what = (f"per-expert {', '.join(params)} on {', '.join(projs)}" if e["tensors"]
                else "no per-expert tensors (the replica is the base)")
        print(f"  layer {e['layer']} x{e['replica']}: {e['mode']}, weight {e['weight']:.4g}, experts "
              f"{', '.join(map(str, e['experts']))} ({len(e['experts'])} of {n_expert}); {what}")


def _print_adapter(info: dict, show_tensors: bool) -> None:
    b = info["base"]
    print(info["file"])
    print(f"  lrq adapter v{info['adapter_version']} (LRQ format v{info['format_version']}) for a base "
          f"{b['architecture']} of {b['block_count']} layers"
          + (f", file {b['file']}" if b["file"] else "") + (f", type {b['type']}" if b["type"] else ""))
    print(f"  {info['modified_tensors']} modified base weights, {len(info['replica_tensors'])} replica "
          f"tensors ({info['replica_tensor_bytes']} bytes), {info['file_bytes']} bytes")
    print("lrq metadata:")
    for k, v in info["lrq_metadata"].items():
        print(f"  {k} = {v}")
    print(f"schedule: {info['schedule_summary']}")
    for i, e in enumerate(info["schedule"]):
        print(f"  exec {i:3d}: layer {e['layer']:3d} replica {e['replica']} "
              f"group {e['group']:3d} weight {e['weight']:.4g}")
    if show_tensors:
        print("replica tensors:")
        for t in info["replica_tensors"]:
            print(f"  {t['name']:40s} {t['type']:6s} {str(t['shape']):16s} {t['bytes']}")


def _print(info: dict, show_tensors: bool) -> None:
    q = info["quant"]
    print(f"{info['file']}" + (f" with adapter {info['adapter']}" if info.get("adapter") else "")
          + (f" with layer map '{info['layer_map']}'" if info.get("layer_map") else ""))
    print(f"  LRQ format v{info['format_version']}, {info['architecture']} "
          f"(base {info['base_architecture']})")
    h = info["hparams"]
    print(f"  {h['n_layer']} layers, d={h['n_embd']}, ffn={h['n_ff']}, heads {h['n_head']}/{h['n_head_kv']}, "
          f"vocab {h['n_vocab']}")
    x = info.get("experts")
    if x:
        print(f"  experts: {x['n_expert']} per layer in {x['n_moe_layers']} MoE layers, {x['n_used']} used per "
              f"token; stacked experts {', '.join(x['expert_types'])}, router {', '.join(x['router_types'])}"
              + (f", shared expert {', '.join(x['shared_expert_types'])}" if x["shared_expert_types"] else ""))
    if q["mode"] is not None:
        print(f"  quant: {q['mode']}, {q['bits']} bits, group {q['group_size']}, scale search "
              f"{q['scale_search']}, rounding {q['rounding']}")
        if info.get("layout") and q["base_type"] is None:
            print(f"  layout: {info['layout']}")
    if q["base_type"] is not None:
        print(f"  stock-typed base: llama-quantize {q['base_type']}"
              + (f" with {q['base_imatrix']}" if q["base_imatrix"] else "") + "; block linears "
              + ", ".join(q["linear_types"]))
    b = info["bpw"]
    if q["mode"] is not None:
        print(f"  bpw: {b['lrq']:.4f} LRQ weights incl. parameters (recorded {b['lrq_recorded']}), "
              f"{b['linears']:.4f} block linears, {b['file']:.4f} whole file")
    else:
        print(f"  bpw: {b['linears']:.4f} block linears incl. replica parameters, {b['file']:.4f} whole file")
    lr = info["lowrank"]
    if lr["n"]:
        print(f"  low-rank corrections: {lr['n']} (linear, replica) pairs, rank "
              f"{', '.join(map(str, lr['ranks']))}, factors {', '.join(lr['types'])}")
    c = info["counts"]
    print(f"  {c['tensors']} tensors, {c['lrq_weights']} LRQ weights, {c['file_bytes']} bytes")
    print("lrq metadata:")
    for k, v in info["lrq_metadata"].items():
        if not k.startswith("lrq.schedule."):
            print(f"  {k} = {v}")
    print(f"schedule: {info['schedule_summary']}")
    for i, e in enumerate(info["schedule"]):
        print(f"  exec {i:3d}: layer {e['layer']:3d} replica {e['replica']} "
              f"group {e['group']:3d} weight {e['weight']:.4g}")
    _print_expert_entries(info)
    print("metadata:")
    for k, v in info["metadata"].items():
        print(f"  {k} = {v}")
    if show_tensors:
        print("tensors:")
        for t in info["tensors"]:
            print(f"  {t['name']:40s} {t['type']:6s} {str(t['shape']):16s} {t['bytes']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lrq-inspect", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", metavar="FILE", help="an LRQ GGUF, an adapter, or the base of --adapter / --layers")
    ap.add_argument("--adapter", metavar="A.gguf", help="show FILE with this adapter bound (FORMAT.md 11)")
    ap.add_argument("--layers", metavar="MAP", help="show FILE with this layer map (FORMAT.md 7.1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--full-metadata", action="store_true", help="do not shorten long arrays")
    ap.add_argument("--no-tensors", action="store_true", help="leave out the per-tensor table")
    args = ap.parse_args(argv)

    from ..gguf_hparams import GGUFFileError

    adapter_alone = args.adapter is None and args.layers is None and _is_adapter(args.file)
    try:
        info = (collect_adapter(args.file) if adapter_alone
                else collect(args.file, args.full_metadata, args.adapter, args.layers))
    except GGUFFileError as e:
        print(f"lrq-inspect: error: {e}", file=sys.stderr)
        return 1
    for w in info["warnings"]:       # what the loaders accept with a warning (FORMAT.md rule S6)
        print(f"lrq-inspect: warning: {w}", file=sys.stderr)
    try:
        if args.json:
            print(json.dumps(info, indent=2))
        elif adapter_alone:
            _print_adapter(info, not args.no_tensors)
        else:
            _print(info, not args.no_tensors)
    except BrokenPipeError:     # `lrq-inspect FILE | head` is fine
        sys.stdout = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
