"""Run every benchmark and record the tables in benchmarks/README.md (``./dev bench``).

    .venv/bin/python benchmarks/run.py [--quick] [--only NAME ...] [--no-write]

Each benchmark prints a markdown table (and, on lines of their own in
italics, what it measured); this runs them in turn, prints them, and (unless
--quick or --no-write) replaces the generated section of benchmarks/README.md,
between its ``results`` markers, with the tables and the machine, kernel, nft
and Python versions they were measured with. The user's paths (the daemon,
``--once``, ``--dry-run``, ``/metrics``, latency by packets, each run as a
process) come first; the in-process measurements of the core after them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cold_start, datapath, packet_latency, partial_sync, programming_latency, read_back, scrape, user_paths
from benchmarks import compile as compile_bench
from benchmarks.netns import versions

BENCHMARKS = {
    "user-daemon": ("User path: the daemon, exec to programmed", user_paths.main_daemon),
    "user-files": ("User path: --once and --dry-run on kubectl exports", user_paths.main_files),
    "scrape": ("User path: /metrics scrapes of an idle daemon", scrape.main),
    "packet-latency": ("User path: network programming latency by packets", packet_latency.main),
    "read-back": ("Restart: reading kproxy's tables back", read_back.main),
    "compile": ("Compile (pure core)", compile_bench.main),
    "cold-start": ("Cold start on an empty node", cold_start.main),
    "partial-sync": ("Partial syncs in a loaded table", partial_sync.main),
    "programming-latency": ("Network programming latency", programming_latency.main),
    "datapath": ("New-connection latency through a ClusterIP", datapath.main),
}
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    info = versions()
    measured = (f"Measured {time.strftime('%Y-%m-%d')}, Linux {info['kernel']}, {info['cpu']}, "
                f"Python speed {info['speed']} (a 10M-step loop; lower is faster).")
    sections = [
        f"Last run {time.strftime('%Y-%m-%d')} on {info['machine']} ({info['cpu']}; Python speed {info['speed']}: "
        f"the best of 3 runs of a 10M-step `for` loop, `benchmarks/netns.py`), Linux {info['kernel']}, "
        f"{info['nft']}, Python {info['python']}; each section says when it was measured (`--only` keeps the others)."
    ]
    for name in args.only or list(BENCHMARKS):
        title, run = BENCHMARKS[name]
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            run(["--quick"] if args.quick else [])
        lines = captured.getvalue().splitlines()
        notes = [line for line in lines if line.startswith("_")]
        tables: list[list[str]] = []  # consecutive table lines; a line of anything else ends a table
        for previous, line in zip(["", *lines], lines, strict=False):
            if line.startswith("|"):
                if not previous.startswith("|"):
                    tables.append([])
                tables[-1].append(line)
        table = "\n\n".join([*notes, *("\n".join(rows) for rows in tables)])
        print(f"\n## {title}\n\n{table}", flush=True)
        sections.append(f"### {title} (`benchmarks/{run.__module__.split('.')[-1]}.py`)\n\n_{measured}_\n\n{table}")
    if args.quick or args.no_write:
        return
    text = README.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        old, tail = rest.split(END, 1)
        # Keep the recorded tables of benchmarks not run this time (--only).
        kept = {block.split("\n", 1)[0]: "### " + block.strip() for block in old.split("### ")[1:]}
        for section in sections[1:]:
            kept[section[4:].split("\n", 1)[0]] = section
        order = [f"{t} (`benchmarks/{r.__module__.split('.')[-1]}.py`)" for t, r in BENCHMARKS.values()]
        blocks = [kept[title] for title in order if title in kept]
        README.write_text(f"{head}{START}\n\n" + "\n\n".join([sections[0], *blocks]) + f"\n\n{END}{tail}")
        print(f"\nrecorded in {README}")


if __name__ == "__main__":
    main()
