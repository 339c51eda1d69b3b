"""Run a grid of trainings one after another: every combination of the comma-separated values.

python launch/sweep.py recipe=water_potability optimizer.lr=1e-3,3e-3 trainer.batch_size=32,64
python launch/sweep.py --launcher "accelerate launch --multi_gpu --num_processes 2" recipe=mnist_cnn \
                         optimizer.lr=1e-3,3e-4
python launch/sweep.py --config my_task.yaml --name betas "optimizer.betas=[0.9,0.999],[0.8,0.99]"

A value with a comma outside brackets and quotes is swept; a list is one value ([0.9,0.999]), several
lists are several values, a text with a comma is quoted ('a,b'). Each run is a child launch/train.py named
<sweep name>-<number>-<key>=<value>... in <output_dir>/<recipe>/, all in one W&B group where the config
has tracking.group; every combination is checked before the first run starts. A failed run is reported
and the next one starts; the sweep ends with the compare table. Exit: 0 all succeeded, 1 some failed,
2 a bad argument (nothing run), 130 Ctrl-C (the running child is stopped too; the same command with
--name continues: finished runs are kept, a run with a checkpoint resumes).
For a W&B sweep (random or Bayesian search, several agents) see launch/sweeps/*.yaml.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline import sweep  # noqa: E402
from pipeline.config_checks import check_run_name  # noqa: E402
from pipeline.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [--config FILE] key=value[,value ...] ...",
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    parser.add_argument(
        "--launcher",
        help="the command before launch/train.py (default: this Python), e.g. "
        '"accelerate launch --multi_gpu --num_processes 2"',
    )
    parser.add_argument(
        "--name",
        help="the sweep's name: the runs' name prefix and W&B group "
        "(default: sweep-<date>-<time>); reuse one to continue a stopped sweep",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="a YAML file of config keys under the command line's, as for launch/train.py"
    )
    parser.add_argument("--dry-run", action="store_true", help="print each run's command and exit")
    args, overrides = parser.parse_known_args(argv)
    try:
        name = args.name or sweep.default_name()
        check_run_name(name)  # the runs' folder names start with it
        command = sweep.launcher_command(args.launcher)
        runs = sweep.plan(
            [*(["--config", args.config] if args.config else []), *overrides], name, recipe=not args.dry_run
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for r in runs:
            print(" ".join(sweep.shlex.quote(w) for w in [*command, str(sweep.TRAIN), *r.argv]))
        return 0
    sweep.say(f"{name}: {len(runs)} run{'s' if len(runs) > 1 else ''} into {runs[0].run_dir.parent}")
    return sweep.run(runs, command, name)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # before the first run started (later, the sweep handles Ctrl-C itself)
        sys.exit(130)
