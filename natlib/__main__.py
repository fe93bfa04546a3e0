"""Command line: ``python -m natlib notebooks [PATH ...]`` and ``python -m natlib bench ...``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written (its folder is created if missing), or ``None``."""
    if path.is_dir():
        return f"{path} is a folder; give a file name."
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable."
    folder = path.parent
    while not folder.exists():  # write_json creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder."
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable."
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m natlib")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("notebooks", help="re-execute book notebooks in place")
    run.add_argument("paths", nargs="*", type=Path, help="notebooks (default: book/*.ipynb)")
    run.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    bench = commands.add_parser("bench", help="run a benchmark and print its numbers")
    bench.add_argument(
        "name",
        choices=[
            "curvature",
            "kfac",
            "scaling",
            "approximations",
            "distributed",
            "newton",
            "sweep",
            "training",
        ],
        help="which benchmark (distributed: K-FAC's refresh in 1 and 2 processes)",
    )
    bench.add_argument(
        "--problem",
        choices=["kfac-ngd", "autoencoder", "digits", "cnn", "transformer"],
        help="sweep: kfac-ngd (default, K-FAC against exact NGD) or autoencoder (K-FAC, SGD "
        "and Adam); training: digits (default, the classifier), autoencoder (both tanh MLPs, "
        "chapter 5), cnn (the digits CNN) or transformer (the character-level race; chapter 3)",
    )
    bench.add_argument(
        "--model",
        choices=["mlp", "cnn", "transformer"],
        default="mlp",
        help="kfac: the tanh MLP (default), the digits CNN or the character transformer",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=1,
        help="kfac on the MLP: torch threads (default 1, timed on the process's CPU clock; "
        "more threads are timed on the wall clock)",
    )
    bench.add_argument("--json", "--out", type=Path, help="also write the numbers as JSON here")
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], help="where to run it (default: natlib.device())"
    )
    args = parser.parse_args(argv)
    if args.command == "bench" and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}.")

    if args.command == "notebooks":
        if args.timeout < 1:
            parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}.")
        for path in args.paths:
            if path.suffix != ".ipynb" or not path.is_file():
                parser.error(f"{path} is not a notebook file (.ipynb).")
        from natlib.notebooks import book_notebooks, execute

        execute(args.paths or book_notebooks(), timeout=args.timeout)
    elif args.command == "bench":
        from natlib import timing

        try:  # NATLIB_DEVICE or --device asking for what this machine lacks
            timing.resolve_device(args.device)
        except (ValueError, RuntimeError) as error:
            parser.error(str(error))
        if args.json is not None and (reason := _unwritable(args.json)):
            parser.error(f"--out: {reason}")

        from natlib import bench as benchmarks
        from natlib import (
            bench_distributed,
            comparison,
            feasibility,
            fidelity,
            race,
            scaling,
            sweeps,
        )

        training = [*comparison.TASKS, "transformer"]
        problem = args.problem or {"sweep": "kfac-ngd", "training": "digits"}.get(args.name)
        allowed = {"sweep": sweeps.PROBLEMS, "training": training}.get(args.name)
        if args.problem and (allowed is None or args.problem not in allowed):
            parser.error(
                f"--problem {args.problem} does not apply to bench {args.name}"
                + (f"; use one of {', '.join(allowed)}." if allowed else ".")
            )
        if args.name == "training" and problem == "transformer" and args.device == "cuda":
            parser.error("training --problem transformer races on the CPU clock; drop --device.")
        if args.name == "sweep":
            reported = sweeps.benchmark(problem, device=args.device)
            print(reported.report())
            if args.json:
                sweeps.write_record(reported.record, args.json)
            return
        chosen = {
            "curvature": lambda: benchmarks.curvature_benchmark(device=args.device),
            "kfac": lambda: (
                benchmarks.kfac_benchmark(device=args.device, threads=args.threads)
                if args.model == "mlp"
                else benchmarks.architecture_benchmark(args.model, device=args.device)
            ),
            "scaling": lambda: scaling.benchmark(args.device),
            "approximations": lambda: fidelity.approximations_benchmark(device=args.device),
            "distributed": lambda: bench_distributed.benchmark(args.device),
            "newton": lambda: feasibility.measure(device=args.device or "cpu"),
            "training": lambda: (
                race.run(progress=True)
                if problem == "transformer"
                else comparison.compare_optimizers(problem, device=args.device or "cpu")
            ),
        }
        result = chosen[args.name]()
        print(result.report())
        if args.json:
            timing.write_json(result, args.json)


if __name__ == "__main__":
    main()
