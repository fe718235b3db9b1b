"""The `autoq` command line. Thin: parses arguments, calls the library, prints.

    autoq dispatch bench [--out TABLE.json] [--suite SHAPES.toml] [--threads N] [--limit N]
    autoq dispatch show TABLE.json
    autoq dispatch export --study NAME [--storage URL] --out TABLE.json
    autoq dispatch apply MODEL.autoq TABLE.json|shipped --out NEW.autoq
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import optuna
import torch

from autoq.dispatch.apply import apply_dispatch
from autoq.dispatch.measured import LayerTimer
from autoq.dispatch.rule import DEPTH
from autoq.dispatch.suite import PASSES, SECONDS_PER_SHAPE, bench_table, load_suite
from autoq.dispatch.table import DispatchTable, Entry
from autoq.result import load, save
from autoq.search.study import layer_timings, storage_url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoq", description="Accuracy-aware int8 tuning for x86 CPUs.")
    commands = parser.add_subparsers(dest="command", required=True)
    dispatch = commands.add_parser("dispatch", help="per-layer int8 kernel dispatch tables (FBGEMM vs oneDNN)")
    actions = dispatch.add_subparsers(dest="action", required=True)

    bench = actions.add_parser("bench", help="time the shape suite under both libraries; write a table for this CPU")
    bench.add_argument("--out", default="dispatch-table.json", help="table to write (default: %(default)s)")
    bench.add_argument("--suite", default=None, help="shape suite TOML (default: the shipped kernels/shapes.toml)")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    bench.add_argument("--limit", type=int, default=None, help="time only the first N shapes of the suite")
    bench.add_argument("--max-depth", type=int, default=DEPTH, help="depth of the learned rule's tree")
    bench.add_argument("--seconds", type=float, default=SECONDS_PER_SHAPE,
                       help="timing effort per shape in seconds (default: %(default)s)")
    bench.add_argument("--passes", type=int, default=PASSES, help="times the suite is timed over (default: %(default)s)")
    bench.add_argument("--quiet", action="store_true", help="no per-shape progress")

    show = actions.add_parser("show", help="print a table's CPU, learned rule and held-out accuracy")
    show.add_argument("table")

    export = actions.add_parser("export", help="write the per-layer timings a tuning study measured as a table")
    export.add_argument("--study", required=True, help="study name (TuneResult.study_name)")
    export.add_argument("--storage", default=None, help="Optuna storage URL (default: autoq-runs/autoq.db)")
    export.add_argument("--out", required=True, help="table to write")

    apply = actions.add_parser("apply", help="re-pack a saved int8 model's layers per a table (no re-tuning)")
    apply.add_argument("model", help="model file written by TuneResult.save or autoq.save")
    apply.add_argument("table", help="dispatch table JSON, or 'shipped' for autoq's table for this CPU")
    apply.add_argument("--out", required=True, help="model file to write")

    args = parser.parse_args(argv)
    try:
        if args.action == "apply":
            _apply(args)
            return 0
        table = {"bench": _bench, "show": _show, "export": _export}[args.action](args)
    except ValueError as error:
        print(f"autoq: error: {error}", file=sys.stderr)
        return 2
    print(describe(table))
    return 0


def _bench(args: argparse.Namespace) -> DispatchTable:
    shapes = load_suite(args.suite)[: args.limit]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def progress(done: int, total: int, entry: Entry | None) -> None:
        if args.quiet:
            return
        if entry is None:  # an earlier pass: no final timing yet
            print(f"\r[{done:4d}/{total}] timing the suite", end="", file=sys.stderr)
        else:
            timings = "  ".join(f"{lib} {us:8.1f} us" for lib, us in entry.micros.items())
            print(f"\r[{done:4d}/{total}] {entry.shape.key():60s} {timings}  -> {entry.library}", file=sys.stderr)

    table = bench_table(shapes, threads=args.threads, max_depth=args.max_depth, seconds=args.seconds,
                        passes=args.passes, progress=progress)
    table.save(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return table


def _show(args: argparse.Namespace) -> DispatchTable:
    return DispatchTable.load(args.table)


def _export(args: argparse.Namespace) -> DispatchTable:
    try:
        study = optuna.load_study(study_name=args.study, storage=storage_url(args.storage))
    except KeyError as error:
        raise ValueError(f"no study named {args.study!r} in {storage_url(args.storage)}") from error
    stored = layer_timings(study)
    if not stored:
        raise ValueError(f"study {args.study!r} measured no per-layer kernel timings (no 'measured' trial ran).")
    table = DispatchTable.for_this_machine(LayerTimer(stored).entries())
    table.refit()
    table.save(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return table


def _apply(args: argparse.Namespace) -> None:
    model = load(args.model)
    engines = apply_dispatch(model, args.table)
    save(model, args.out)
    onednn = sum(library == "onednn" for library in engines.values())
    print(f"wrote {args.out}: {onednn} layers on oneDNN, {len(engines) - onednn} on FBGEMM")


def describe(table: DispatchTable) -> str:
    """A dispatch table in a few lines: CPU, size, learned rule, held-out accuracy."""
    wins = sum(entry.library == "onednn" for entry in table.entries.values())
    lines = [
        f"dispatch table for {table.cpu.describe()}",
        f"  torch {table.torch_version}, {table.threads} threads, created {table.created or '?'}",
        f"  {len(table.entries)} measured shapes: oneDNN faster on {wins}, FBGEMM on {len(table.entries) - wins}",
    ]
    if table.rule is not None:
        heldout = table.rule.heldout
        if heldout:
            lines.append(
                f"  learned rule, {heldout['splits']} random splits with {heldout['shapes']} shapes held out: "
                f"within {heldout['tolerance']:.0%} of the faster library for {heldout['within_tolerance']:.1%} of "
                f"held-out shapes (worst split {heldout['worst_split']:.1%}; PyTorch's x86 rule {heldout['x86_rule']:.1%})")
        lines.append("  rule:")
        lines += ["    " + line for line in table.rule.text().splitlines()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
