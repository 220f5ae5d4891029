"""The long fuzzing run: the properties of tests/unit/test_fuzz.py, for a million inputs or more.

    python scripts/fuzz.py --inputs 1000000            # all properties, one worker per core
    python scripts/fuzz.py --seconds 600 --property jwt --property pipeline

Same strategies and invariants as the unit tests (tests/support/fuzzing.py), but random rather
than derandomized: each worker process runs the properties in turn, in hypothesis runs of
``--batch`` examples, each run with its own seed, until ``--inputs`` cases were checked in total
or ``--seconds`` have passed. Every checked case counts, including those hypothesis replays
while it shrinks a failure. A failure is shrunk and printed with the command that replays its
run (a failure does not stop the others); the exit status is 1 if there was one.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Seeds of one worker's runs: base + worker * SEED_STRIDE + run number.
SEED_STRIDE = 1_000_000


@dataclass
class Batch:
    """What a worker reports after each hypothesis run."""

    worker: int
    prop: str
    seed: int
    outcomes: Counter[str]
    seconds: float
    #: The shrunk failure: its traceback with hypothesis' example, and a one-line kind.
    failure: str | None = None
    kind: str | None = None


@dataclass
class Totals:
    inputs: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[Batch] = field(default_factory=list)

    def add(self, batch: Batch) -> None:
        self.inputs[batch.prop] += sum(batch.outcomes.values())
        self.seconds[batch.prop] += batch.seconds
        self.outcomes.setdefault(batch.prop, Counter()).update(batch.outcomes)
        if batch.failure is not None:
            self.failures.append(batch)


def worker(index: int, args: argparse.Namespace, stop: Any, results: Any) -> None:
    """Run the selected properties in turn until ``stop`` is set."""
    import warnings

    import hypothesis

    from tests.support.fuzzing import all_properties, run_property

    # As in production, warnings are not errors (the unit tests run with pytest's
    # filterwarnings=error, so both settings are covered); cryptography's warnings about
    # odd subject values would only fill the output.
    warnings.simplefilter("ignore")

    # Health checks (slow generation, large data) are exercised by the unit tests; on a busy
    # machine they would only end runs here. The database would keep every failure on disk.
    config = hypothesis.settings(
        max_examples=args.batch,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    with tempfile.TemporaryDirectory(prefix="csr-service-fuzz-") as tmp:
        props = [p for p in all_properties(Path(tmp) / "ca") if not args.property or p.name in args.property]
        run = 0
        while not stop.is_set() and (args.runs is None or run < args.runs):
            prop = props[run % len(props)]
            seed = args.seed + index * SEED_STRIDE + run
            outcomes: Counter[str] = Counter()
            started = time.perf_counter()
            failure = kind = None
            try:
                run_property(prop, config, outcomes, seed=seed)
            except Exception as exc:  # noqa: BLE001 - a broken invariant, reported with its example
                failure, kind = "".join(traceback.format_exception(exc)), _kind(exc)
            results.put(Batch(index, prop.name, seed, outcomes, time.perf_counter() - started, failure, kind))
            run += 1


def _kind(exc: BaseException) -> str:
    """One line per distinct failure (hypothesis raises a group when it found several)."""
    if isinstance(exc, BaseExceptionGroup):
        return " + ".join(sorted({_kind(e) for e in exc.exceptions}))
    return f"{type(exc).__name__}: {str(exc).partition(chr(10))[0][:120]}"


def _print_progress(totals: Totals, started: float) -> None:
    elapsed = time.monotonic() - started
    total = sum(totals.inputs.values())
    per_prop = "  ".join(f"{name} {n}" for name, n in sorted(totals.inputs.items()))
    print(f"[{elapsed:7.0f}s] {total} inputs, {total / elapsed:.0f}/s, {len(totals.failures)} failures | {per_prop}")
    sys.stdout.flush()


def _print_summary(totals: Totals, args: argparse.Namespace, elapsed: float) -> None:
    total = sum(totals.inputs.values())
    print(f"\n{total} inputs in {elapsed:.0f} s: {total / elapsed:.0f} inputs/s with {args.workers} workers")
    for name in sorted(totals.inputs):
        n, cpu = totals.inputs[name], totals.seconds[name]
        print(f"\n{name}: {n} inputs, {n / cpu:.0f}/s per worker")
        for label, count in totals.outcomes[name].most_common(args.top):
            print(f"  {count:9d}  {label}")
        rest = len(totals.outcomes[name]) - args.top
        if rest > 0:
            print(f"  ... and {rest} other outcomes")
    print(f"\nfailures: {len(totals.failures)}")
    kinds: dict[tuple[str, str | None], list[Batch]] = {}
    for batch in totals.failures:
        kinds.setdefault((batch.prop, batch.kind), []).append(batch)
    for (prop, kind), batches in kinds.items():
        print(f"\n--- {prop}: {kind} ({len(batches)} runs)")
        for batch in batches:
            print(
                f"replay: python scripts/fuzz.py --workers 1 --property {prop} --seed {batch.seed} "
                f"--batch {args.batch} --runs 1"
            )
        print(batches[0].failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1_000_000, help="stop after this many checked cases in total")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (whichever comes first)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    parser.add_argument("--batch", type=int, default=2000, help="examples per hypothesis run")
    parser.add_argument("--seed", type=int, default=0, help="seed of worker 0's first run")
    parser.add_argument("--property", action="append", help="only this property (repeatable)")
    parser.add_argument("--runs", type=int, default=None, help="stop each worker after this many runs (replays)")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--top", type=int, default=12, help="outcomes listed per property")
    args = parser.parse_args(argv)

    # spawn, not fork: every worker builds its own keys, CA and hypothesis state.
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, args, stop, results), daemon=True) for i in range(args.workers)]
    print(f"fuzzing with {args.workers} workers, {args.batch} examples per run, seed {args.seed}: {' '.join(sys.argv)}")
    started = time.monotonic()
    for proc in procs:
        proc.start()
    totals, last_report = Totals(), started
    try:
        while sum(totals.inputs.values()) < args.inputs and (
            args.seconds is None or time.monotonic() - started < args.seconds
        ):
            try:
                totals.add(results.get(timeout=1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # --runs reached (or the workers died: see their output above)
            if time.monotonic() - last_report >= args.report_every:
                _print_progress(totals, started)
                last_report = time.monotonic()
    finally:
        stop.set()
        # Each worker ends after its current run; count those runs too.
        while any(p.is_alive() for p in procs) or not results.empty():
            with contextlib.suppress(queue.Empty):
                totals.add(results.get(timeout=1.0))
        for proc in procs:
            proc.join()
    _print_summary(totals, args, time.monotonic() - started)
    return 1 if totals.failures else 0


if __name__ == "__main__":
    sys.exit(main())
