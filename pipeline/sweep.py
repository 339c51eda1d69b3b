"""A local grid of runs: every combination of the comma-separated values, one launch/train.py after another.

The runs share one parent folder and one W&B group, are named after their values, and end in one compare table.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline import cli, compare, config, overrides
from pipeline.errors import CompareError, ConfigError

TRAIN = Path(__file__).resolve().parent.parent / "launch" / "train.py"
# Characters a run folder's name leaves out or replaces: brackets and quotes would make its path a glob
# pattern or need quoting in a shell, separators would make it two folders.
DROPPED = str.maketrans("", "", "[]{}()'\" ")
REPLACED = str.maketrans({c: "_" for c in "/\\*?:"})


@dataclass
class SweepRun:
    """One combination: its swept values, its arguments for launch/train.py and where it writes."""

    index: int
    values: dict[str, str]
    argv: list[str]
    run_dir: Path | None  # None in a dry run
    outcome: str = "not run"  # ok | failed (exit N) | finished earlier | stopped | not run
    code: int | None = None


def split_values(key: str, raw: str) -> list[str]:
    """`1e-3,3e-3` -> ["1e-3", "3e-3"]. A comma inside brackets, braces or quotes belongs to its value, so a
    list is one value and several lists are several: `[16,8],[32]` -> ["[16,8]", "[32]"]; a text with a
    comma is quoted: `'a,b'`."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    if len(values) > 1 and not all(v.strip() for v in values):
        raise ConfigError(f"{key}={raw}: an empty value between commas; give each value, e.g. {key}=1e-3,3e-3")
    return values


def grid(dotlist: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The fixed `key=value` items and the swept keys with their values (a key given twice: the last)."""
    fixed, swept = [], {}
    for item in dotlist:
        key, _, raw = item.partition("=")
        if key == "run_name":
            raise ConfigError(
                "run_name is chosen per run by the sweep (<sweep name>-<number>-<values>); "
                "name the sweep with --name NAME instead"
            )
        values = split_values(key, raw)
        swept.pop(key, None)
        if len(values) > 1:
            swept[key] = values
        else:
            fixed = [f for f in fixed if f.partition("=")[0] != key] + [item]
    return fixed, swept


def labels(keys: list[str]) -> dict[str, str]:
    """Each swept key's label in run names: its last part (lr), or the whole key where two share it."""
    last = [k.rpartition(".")[2] for k in keys]
    return {k: leaf if last.count(leaf) == 1 else k for k, leaf in zip(keys, last)}


def run_name(sweep: str, index: int, width: int, values: dict[str, str], label: dict[str, str]) -> str:
    """`<sweep>-<number>-lr=1e-3-batch_size=32`: findable by value, ordered by number, one plain folder."""
    parts = [f"{label[k]}={v.translate(DROPPED).translate(REPLACED)}" for k, v in values.items()]
    name = "-".join([sweep, f"{index:0{width}d}", *parts])
    return name if len(name.encode()) <= 255 else f"{sweep}-{index:0{width}d}"


def plan(argv: list[str], name: str, recipe: bool = True) -> list[SweepRun]:
    """Every combination, each checked as launch/train.py would check it, before any run starts: a typo
    in the last combination stops the sweep now, not after hours of the first ones. `recipe=False` (a dry
    run): only the checks that need no recipe, which would import torch; no run_dir."""
    argv, preset = overrides.take_preset(argv)
    head = ["--config", preset] if preset else []
    fixed, swept = grid(overrides.split_argv(argv))
    combos = [dict(zip(swept, values)) for values in itertools.product(*swept.values())]
    width, label = len(str(len(combos))), labels(list(swept))
    runs = []
    for index, values in enumerate(combos, 1):
        items = [
            *fixed,
            *(f"{k}={v}" for k, v in values.items()),
            f"run_name={run_name(name, index, width, values, label)}",
        ]
        if config.given(items, "tracking.group") is None:  # one W&B group for the sweep; a group given is kept
            items.append(f"tracking.group={name}")
        try:
            checked = cli.parse([*head, *items]) if recipe else cli.read([*head, *items])
        except ConfigError as e:
            raise ConfigError(
                f"run {index} of the sweep ({' '.join(f'{k}={v}' for k, v in values.items())}): {e}"
            ) from None
        run_dir = Path(checked[1].output_dir) / checked[0].name / checked[1].run_name if recipe else None
        runs.append(SweepRun(index, values, [*head, *items], run_dir))
    return runs


def launcher_command(launcher: str | None) -> list[str]:
    """The command before launch/train.py: this Python, or e.g. `accelerate launch --multi_gpu ...`."""
    if not launcher:
        return [sys.executable]
    words = shlex.split(launcher)
    # Beside this Python first: `accelerate` of the environment the sweep runs in, activated or not.
    found = words and (shutil.which(words[0], path=str(Path(sys.executable).parent)) or shutil.which(words[0]))
    if not found:
        raise ConfigError(
            f"--launcher {launcher!r}: {words[0] if words else 'nothing'} is not a command found "
            f'on PATH; e.g. --launcher "accelerate launch --multi_gpu --num_processes 2"'
        )
    return [found, *words[1:]]


def default_name() -> str:
    return datetime.now().strftime("sweep-%Y%m%d-%H%M%S")


class Children:
    """The one training child at a time, and the signal that stopped the sweep. Each child runs in a session
    of its own, so a Ctrl-C reaches the sweep alone and is passed on once to every process of the child
    (those of `accelerate launch` too); a second one kills them."""

    def __init__(self):
        self.current: subprocess.Popen | None = None
        self.stopped_by: int | None = None

    def receive(self, signum, frame) -> None:
        again = self.stopped_by is not None
        self.stopped_by = self.stopped_by or signum
        self.pass_on(signal.SIGKILL if again else signum)

    def pass_on(self, signum: int) -> None:
        if self.current is not None and self.current.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.current.pid, signum)

    def run(self, command: list[str]) -> int:
        self.current = subprocess.Popen(command, start_new_session=True)
        if self.stopped_by:  # the signal came while the child was being started
            self.pass_on(self.stopped_by)
        try:
            return self.current.wait()  # a signal's handler runs inside; the wait goes on until the child ends
        finally:
            self.current = None


def say(text: str) -> None:
    print(f"[sweep] {text}", flush=True)  # before the child writes to the same terminal


def run(runs: list[SweepRun], command: list[str], name: str) -> int:
    """Runs every combination in turn; a failed one is reported and the next one starts. Exit code: 0 when
    all succeeded, 1 when any failed, 128+N when signal N (Ctrl-C: 130) stopped the sweep."""
    children = Children()
    previous = {s: signal.signal(s, children.receive) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for r in runs:
            if children.stopped_by:
                break
            if (r.run_dir / "summary.json").exists():
                r.outcome = "finished earlier"
                say(f"run {r.index}/{len(runs)} {r.run_dir} finished earlier: kept")
                continue
            say(f"run {r.index}/{len(runs)}: {' '.join(f'{k}={v}' for k, v in r.values.items())} -> {r.run_dir}")
            r.code = code = children.run([*command, str(TRAIN), *r.argv])
            code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a shell says
            r.outcome = "ok" if code == 0 else "stopped" if children.stopped_by else f"failed (exit {code})"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    report(runs, name)
    if children.stopped_by:
        say(
            f"stopped by {signal.Signals(children.stopped_by).name}; the same command with --name {name} "
            f"continues it (finished runs are kept, a run with a checkpoint resumes)"
        )
        return 128 + children.stopped_by
    return 0 if all(r.outcome in ("ok", "finished earlier") for r in runs) else 1


def report(runs: list[SweepRun], name: str) -> None:
    """Each run's outcome, then the compare table of every run that made its folder."""
    for r in runs:
        say(f"{r.outcome:<17} {r.run_dir.name}")
    made = [r.run_dir for r in runs if (r.run_dir / "config.yaml").is_file()]
    if not made:
        say("no run made its folder: no table")
        return
    try:
        header, rows = compare.table([compare.read_run(p) for p in made])
    except CompareError as e:
        say(f"no table: {e}")
        return
    print(compare.markdown(header, rows), flush=True)
    say(f"again later: python launch/compare.py '{made[0].parent}/{name}-*'")
