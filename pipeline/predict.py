"""Predictions of a finished run's model for new inputs in the recipe's raw format, written as CSV.

The inputs are read and preprocessed by the recipe's `read_inputs` with the run's stored statistics
(meta.json), never statistics of the new data; the outputs are named by its `predicted`. A `read_inputs`
that yields its inputs a chunk at a time (the image recipes: a folder larger than memory) is predicted a
chunk at a time, each written out before the next is read.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from pipeline import config, files, overrides, runs
from pipeline.errors import ConfigError, DataError
from pipeline.recipe import Recipe, model_inputs

SHOWN_ROWS = 5  # rows of the predictions shown on the console


@dataclass
class Request:
    """What `launch/predict.py` was asked: `run=`, `input=`, `output=`, `weights=`."""

    run_dir: Path
    input: Path
    output: Path
    weights: str = "final"


def parse_argv(argv: list[str]) -> tuple[Recipe, object, Request]:
    """`run=DIR input=PATH [output=FILE.csv] [weights=final|best|FILE] [data.KEY=VALUE ...]` -> recipe, config,
    request."""
    dotlist = overrides.split_argv(argv)
    own = {key: config.given(dotlist, key) for key in ("run", "input", "output", "weights")}
    if not own["run"]:
        raise ConfigError("which run? Give its folder: run=runs/<recipe>/<run_name> input=<file or folder>")
    if not own["input"]:
        raise ConfigError(
            "what to predict? Give the new inputs in the recipe's raw format: input=<file or folder> "
            "(e.g. a CSV with the feature columns, an image file or a folder of images)"
        )
    run_dir, source = Path(own["run"]), Path(own["input"])
    weights = own["weights"] or runs.reported_weights(run_dir)  # or a file's path: checked by runs.weights_file below
    recipe, cfg, _ = runs.load_run(run_dir, [item for item in dotlist if item.partition("=")[0] not in own])
    if recipe.read_inputs is None:
        raise ConfigError(
            f"recipe {recipe.name!r} does not predict on new inputs: it has no `read_inputs`.\n"
            f"Fix: give its Recipe a read_inputs=(cfg, meta, path) -> (ids, columns) that reads new "
            f"inputs as prepare() reads raw data (see docs/writing-a-recipe.md); "
            f"launch/evaluate.py scores the run on labelled data"
        )
    runs.weights_file(run_dir, weights)  # before any work
    if not source.exists():
        raise DataError(f"input {source} does not exist.\nFix: give the path of the new inputs, input=<file or folder>")
    output = Path(own["output"]) if own["output"] else run_dir / "predictions" / f"{source.stem or 'input'}.csv"
    if output.resolve() == source.resolve() or output.is_dir():
        what = "the input itself" if output.resolve() == source.resolve() else "a folder"
        raise ConfigError(
            f"output={output} is {what}; predictions never overwrite it.\nFix: give another file, "
            f"output=predictions.csv"
        )
    return recipe, cfg, Request(run_dir, source, output, weights)


def predict(recipe: Recipe, cfg, request: Request) -> Path:
    """Reads the inputs, runs the model on them in batches of trainer.eval_batch_size, writes the CSV."""
    started = time.perf_counter()
    state = PartialState(cpu=not torch.accelerator.is_available())
    if state.num_processes > 1:
        raise ConfigError(
            "predict runs as one process (it reads the inputs once and writes one file).\nFix: "
            "python launch/predict.py ... (not accelerate launch with several processes)"
        )
    meta = runs.read_meta(request.run_dir)
    model = runs.load_model(request.run_dir, recipe, cfg, meta, request.weights).to(state.device).eval()
    seen = Seen()
    with csv_writer(request.output) as writer:
        for ids, columns in chunks(recipe.read_inputs(cfg, meta, request.input)):
            rows = check_rows(recipe, ids, columns, request.input)
            outputs = run_model(recipe, cfg, model, meta, columns, state.device)
            table = {**ids, **recipe.predicted(outputs, meta)}
            for name, values in table.items():
                if len(values) != rows:
                    raise ConfigError(
                        f"recipe {recipe.name!r}: its predicted() gave {len(values)} values for "
                        f"column {name!r}, but there are {rows} inputs.\nFix: return one value per "
                        f"row of outputs"
                    )
            if not seen.rows:
                writer.writerow(table)  # the header
            writer.writerows(zip(*(_plain(values) for values in table.values())))
            seen.add(table, rows)
        if not seen.rows:
            raise DataError(
                f"{request.input} holds no inputs to predict on.\nFix: point input= at a file or folder with data"
            )
    state.print(result_text(recipe, request, seen, time.perf_counter() - started))
    return request.output


def chunks(inputs) -> Iterator[tuple[dict, dict]]:
    """What a recipe's read_inputs returned, as chunks: one (ids, columns) pair, or the pairs it yields."""
    if isinstance(inputs, tuple):
        yield inputs
    else:
        yield from inputs


@dataclass
class Seen:
    """What the console shows of predictions written a chunk at a time: the row count, the classes'
    counts, the first rows and the last."""

    rows: int = 0
    classes: Counter = field(default_factory=Counter)
    names: list = field(default_factory=list)
    first: list = field(default_factory=list)
    last: list | None = None

    def add(self, table: dict, rows: int) -> None:
        self.names = list(table)
        self.classes.update(table.get("class", ()))
        wanted = min(rows, SHOWN_ROWS - len(self.first))
        self.first += [[_cell(values[i]) for values in table.values()] for i in range(wanted)]
        self.last = [_cell(values[rows - 1]) for values in table.values()]
        self.rows += rows


def check_rows(recipe, ids: dict, columns: dict, source: Path) -> int:
    """The number of inputs, the same in every id and input column."""
    counts = {name: len(values) for name, values in {**ids, **columns}.items()}
    if len(set(counts.values())) != 1:
        raise ConfigError(
            f"recipe {recipe.name!r}: read_inputs gave columns of different lengths {counts}.\nFix: "
            f"return one value per input in every column"
        )
    rows = next(iter(counts.values()))
    if rows == 0:
        raise DataError(f"{source} holds no inputs to predict on.\nFix: point input= at a file or folder with data")
    return rows


def run_model(recipe, cfg, model: torch.nn.Module, meta: dict, columns: dict, device) -> torch.Tensor:
    """The model's outputs for all rows, a batch at a time, after the recipe's evaluation `transform`."""
    inputs = model_inputs(recipe, cfg)
    batch_size, rows = cfg.trainer.eval_batch_size, len(next(iter(columns.values())))
    outputs = []
    with torch.inference_mode():
        for start in range(0, rows, batch_size):
            batch = {
                name: torch.as_tensor(np.asarray(values[start : start + batch_size])).to(device)
                for name, values in columns.items()
            }
            batch = recipe.transform(batch, False, meta)
            outputs.append(model(*(batch[name] for name in inputs)).float().cpu())
    return torch.cat(outputs)


@contextmanager
def csv_writer(path: Path):
    """A csv writer into a temporary file beside `path`, renamed to it when the block ends without an error:
    the predictions are there whole or not at all (an error, a kill or a full disk leaves no CSV under that
    name)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file of its own: two predicts into one output never share it, and a person's own
        # `<output>.tmp` beside it is left alone; the last rename wins, whole.
        with files.replacing(path, newline="") as f:
            yield csv.writer(f, lineterminator="\n")
    except OSError as e:
        raise DataError(
            f"cannot write the predictions to {path} ({e.strerror}).\nFix: choose a writable place, output=<file.csv>"
        ) from None


def _plain(values) -> list:
    """Numbers as Python floats/ints (repr round-trips float32 exactly as float64), text as is."""
    if isinstance(values, (np.ndarray, torch.Tensor)):
        return np.asarray(values).tolist()
    return list(values)


def result_text(recipe, request: Request, seen: Seen, seconds: float) -> str:
    rows = seen.rows
    lines = [
        f"predicted: {rows:,} input{'s' * (rows != 1)} of {request.input} with {recipe.name} "
        f"{runs.WEIGHTS.get(request.weights, request.weights)} in {seconds:.1f} s -> {request.output}"
    ]
    if seen.classes:
        lines.append("classes: " + ", ".join(f"{name} {count:,}" for name, count in seen.classes.most_common()))
    # The first rows and the last one (a series' forecast past the end of its file is its last row).
    shown = seen.first if rows <= SHOWN_ROWS else [*seen.first[: SHOWN_ROWS - 1], seen.last]
    widths = [max(len(name), *(len(row[c]) for row in shown)) for c, name in enumerate(seen.names)]
    lines.append("  ".join(name.ljust(w) for name, w in zip(seen.names, widths)).rstrip())
    for i, row in enumerate(shown):
        if i == SHOWN_ROWS - 1 and rows > SHOWN_ROWS:
            lines.append(f"... {rows - SHOWN_ROWS:,} more rows in {request.output} ...")
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _cell(value) -> str:
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.4f}" if isinstance(value, float) else str(value)
