"""`python -m bench` runs the harness; `--markdown-from FILE` prints the README table."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from rich.console import Console

from .harness import FULL, QUICK, RESULTS, STEPS, run
from .report import Report, markdown


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--full", action="store_true", help="10M-event P5/P6 and longer runs (or BENCH_FULL=1)"
    )
    parser.add_argument(
        "--markdown-from", type=Path, metavar="FILE",
        help="print FILE (a latest.json) as the README's markdown table",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write ({RESULTS})")
    parser.add_argument(
        "--steps", default=",".join(STEPS),
        help=f"comma-separated subset of {','.join(STEPS)} (for profiling one part)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.markdown_from:
        print(markdown(Report.read(args.markdown_from)), end="")
        return
    full = args.full or os.environ.get("BENCH_FULL", "") not in ("", "0")
    console = Console() if Console().is_terminal else Console(width=200)
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    asyncio.run(run(FULL if full else QUICK, console, args.out, steps))


if __name__ == "__main__":
    main()
