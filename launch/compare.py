"""Compare runs from their local records: the config keys that differ, final and best metrics, speed.

python launch/compare.py runs/digits/*                                  # markdown table on stdout
python launch/compare.py runs/digits/* --metrics eval/loss,eval/accuracy --csv runs.csv
python launch/compare.py runs/digits/* --plot accuracy.png --metric eval/accuracy
Offline: reads config.yaml, summary.json and metrics.jsonl in each run folder; a run without
summary.json is shown as "unfinished" with its last logged values.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline import compare  # noqa: E402
from pipeline.errors import CompareError  # noqa: E402


def wrote(path: Path, what: str) -> None:
    # On stderr: stdout holds the markdown table alone, for `> table.md`.
    print(f"compare: wrote {what} to {path}", file=sys.stderr)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or globs (runs/digits/*)")
    parser.add_argument("--metrics", help="comma-separated metric columns (default: final eval/* and test/*)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV to this file")
    parser.add_argument("--plot", type=Path, help="draw --metric against the step for every run into this PNG")
    parser.add_argument("--metric", help="the metric --plot draws (default: the monitored one, else eval/loss)")
    args = parser.parse_args(argv)
    try:
        runs = [compare.read_run(p) for p in compare.expand(args.runs)]
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        header, rows = compare.table(runs, metrics)
        print(compare.markdown(header, rows))
        if args.csv:
            compare.write_csv(args.csv, header, rows)
            wrote(args.csv, "the table as CSV")
        if args.plot:
            metric = args.metric or next(
                (k[len("best/") :] for k in header if k.startswith("best/") and k != "best/epoch"), "eval/loss"
            )
            compare.plot(runs, metric, args.plot)
            wrote(args.plot, f"{metric} against the step")
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
