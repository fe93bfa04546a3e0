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
    args = parser.parse_args(argv)

    if args.command == "notebooks":
        from natlib.notebooks import book_notebooks, execute

        execute(args.paths or book_notebooks(), timeout=args.timeout)


if __name__ == "__main__":
    main()
