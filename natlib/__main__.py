"""Command line: ``python -m natlib notebooks [PATH ...]`` and ``python -m natlib bench ...``."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m natlib")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("notebooks", help="re-execute book notebooks in place")
    run.add_argument("paths", nargs="*", type=Path, help="notebooks (default: book/*.ipynb)")
    run.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    bench = commands.add_parser("bench", help="run a benchmark and print its numbers")
    bench.add_argument("name", choices=["curvature", "kfac", "scaling"], help="which benchmark")
    bench.add_argument("--json", "--out", type=Path, help="also write the numbers as JSON here")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="scaling: where to time it")
    args = parser.parse_args(argv)

    if args.command == "notebooks":
        from natlib.notebooks import book_notebooks, execute

        execute(args.paths or book_notebooks(), timeout=args.timeout)
    elif args.command == "bench":
        from natlib import bench as benchmarks
        from natlib import scaling

        chosen = {
            "curvature": benchmarks.curvature_benchmark,
            "kfac": benchmarks.kfac_benchmark,
            "scaling": lambda: scaling.benchmark(args.device),
        }
        result = chosen[args.name]()
        print(result.report())
        if args.json:
            benchmarks.write_json(result, args.json)


if __name__ == "__main__":
    main()
