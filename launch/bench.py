"""Training throughput of the pipeline vs. a bare in-memory loop vs. the tutorial loop, in one run.

python launch/bench.py --recipe mnist_mlp --data-root data --json bench.json
python launch/bench.py --recipe mnist_cnn --data-root data --device cuda --compile --mixed-precision bf16

Same model, optimizer, batch and data for all paths; samples/s over the steps after the same warm-up
(pipeline.report.WARMUP_STEPS), on CUDA between syncs, every path on the one device --device names.
  pipeline  launch/train.py's loop (Accelerate, shards -> in-memory tensors, per-batch normalize)
  pipeline_stream  the same loop reading each batch from the memory-mapped shards (data.in_memory=false,
            as for data larger than memory; the same batches in the same order)
  bare      tensors already normalized in memory (on the device), sliced per step: the compute limit
  bare_u8   the same, but rows kept as uint8 and normalized per batch, as the pipeline stores them
            (informational: splits the pipeline's gap into the per-batch normalize and the loop)
  tutorial  torchvision dataset + ToTensor/Normalize + DataLoader(batch 64, shuffle), as the tutorials do
--on-device false keeps the pipeline's rows in host memory (copied per batch, as for data too big for
the GPU); the bare paths always index tensors on the device.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline import cli as pipeline_cli  # noqa: E402
from pipeline import optim  # noqa: E402
from pipeline.errors import ConfigError

torch = pipeline_recipe = DataError = WARMUP_STEPS = None  # imported once the arguments are read: --help needs no torch


def import_libraries() -> None:
    global torch, pipeline_recipe, DataError, WARMUP_STEPS
    import torch

    from pipeline import recipe as pipeline_recipe
    from pipeline.errors import DataError
    from pipeline.report import WARMUP_STEPS


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="mnist_mlp", choices=["mnist_mlp", "mnist_cnn", "fashion_mnist_mlp"])
    p.add_argument("--data-root", required=True, help="folder with MNIST/raw/ (or FashionMNIST/raw/)")
    p.add_argument("--json", help="write {'samples_per_s': {...}, 'ratios': {...}} here")
    p.add_argument("--steps", type=int, default=0, help="timed steps per path (default: one epoch)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda where there is one")
    p.add_argument(
        "--on-device",
        default="auto",
        choices=["auto", "true", "false"],
        help="the pipeline's data.on_device (rows on the GPU, or in host memory copied per batch)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="data.num_workers for the streaming path")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in every path")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3, help="each path runs this often; the best run counts")
    p.add_argument("--batch-size", type=int, default=0, help="default: the recipe's")
    return p.parse_args()


def main():
    args = parse_args()
    import_libraries()
    # The pipeline path picks its device by itself: --device cpu hides the GPUs from it, before anything
    # asks CUDA about them (CUDA fixes the devices a process sees at its first query).
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        sys.exit(
            f"error: --device cuda, but torch sees no CUDA device here (CUDA_VISIBLE_DEVICES={visible!r}); "
            "drop --device or pass --device cpu"
        )
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-") as work:  # shards and runs of the pipeline path
        try:
            measure(args, Path(work))
        except (ConfigError, DataError) as e:
            sys.exit(f"error: {e}")


def measure(args, work: Path):
    overrides = [
        f"recipe={args.recipe}",
        f"data.root={args.data_root}",
        f"data.cache_dir={work / 'cache'}",
        f"output_dir={work / 'runs'}",
        "tracking=none",
        "data.download=false",
        f"trainer.compile={str(args.compile).lower()}",
        f"data.on_device={args.on_device}",
    ]
    if args.batch_size:
        overrides.append(f"trainer.batch_size={args.batch_size}")
    recipe, cfg = pipeline_cli.parse(overrides)
    os.environ["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision

    from pipeline import shard_store, tensor_rows

    splits, meta = shard_store.open_shards(shard_store.prepare(recipe, cfg))
    train_cols = tensor_rows.columns(splits["train"])
    per_epoch = len(train_cols["label"]) // cfg.trainer.batch_size
    steps = args.steps = args.steps or per_epoch  # the bare loops read it from args
    # The pipeline runs whole epochs (evaluation between them is not timed) until `steps` are done after
    # its warm-up.
    total = steps + WARMUP_STEPS
    overrides += [f"trainer.epochs={math.ceil(total / per_epoch)}", f"trainer.max_steps={total}"]
    recipe, cfg = pipeline_cli.parse(overrides)
    device = torch.device(args.device)
    print(
        f"bench: {args.recipe} batch {cfg.trainer.batch_size}, {steps} steps/path after {WARMUP_STEPS} warm-up, "
        f"device {device}, compile={args.compile}, mixed_precision={args.mixed_precision}, "
        f"data.on_device={args.on_device}, threads {torch.get_num_threads()}"
    )

    in_memory, streamed = (
        pipeline_cli.parse([*overrides, *extra])[1]
        for extra in (
            ["data.in_memory=true"],
            ["data.in_memory=false", "data.on_device=false", f"data.num_workers={args.num_workers}"],
        )
    )
    runs = {
        "pipeline": lambda: pipeline(in_memory, device),
        "pipeline_stream": lambda: pipeline(streamed, device),
        "bare": lambda: bare(recipe, cfg, meta, train_cols, args),
        "bare_u8": lambda: bare(recipe, cfg, meta, train_cols, args, per_batch=True),
        "tutorial": lambda: tutorial(recipe, cfg, args),
    }
    best = {name: 0.0 for name in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            rate = fn()
            best[name] = max(best[name], rate)
            print(f"  repeat {r + 1} {name:<15} {rate:>10,.0f} samples/s", flush=True)

    ratios = {
        "pipeline/bare": best["pipeline"] / best["bare"],
        "pipeline_stream/pipeline": best["pipeline_stream"] / best["pipeline"],
        "pipeline/bare_u8": best["pipeline"] / best["bare_u8"],
        "pipeline/tutorial": best["pipeline"] / best["tutorial"],
    }
    print(f"\n{'path':<16} {'samples/s':>12} {'x bare':>8} {'x tutorial':>11}")
    for name, rate in best.items():
        print(f"{name:<16} {rate:>12,.0f} {rate / best['bare']:>8.2f} {rate / best['tutorial']:>11.2f}")
    print(f"pipeline_stream / pipeline: {ratios['pipeline_stream/pipeline']:.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "recipe": args.recipe,
                    "device": str(device),
                    "compile": args.compile,
                    "mixed_precision": args.mixed_precision,
                    "on_device": args.on_device,
                    "batch_size": cfg.trainer.batch_size,
                    "steps": steps,
                    "warmup_steps": WARMUP_STEPS,
                    "samples_per_s": best,
                    "ratios": ratios,
                },
                indent=2,
            )
            + "\n"
        )


def pipeline(cfg, device) -> float:
    """The loop's own train/samples_per_s (timed as `timed` times the other paths)."""
    from accelerate.state import AcceleratorState, PartialState

    from pipeline.loop import train

    try:
        rate = train(cfg)["train/samples_per_s"]
        ran_on = PartialState().device.type
    finally:
        AcceleratorState._reset_state(True)
    if ran_on != device.type:  # ratios of paths on different devices would mean nothing
        sys.exit(
            f"error: the pipeline path ran on {ran_on}, the others on {device.type}; "
            f"run with --device {ran_on} or make {device.type} visible to it"
        )
    return rate


def make_model(recipe, cfg, meta, device, args):
    torch.manual_seed(cfg.seed)
    model = recipe.model(cfg, meta).to(device)
    opt = optim.optimizer(cfg.optimizer, model.parameters())
    forward = torch.compile(model) if args.compile else model
    return model, forward, opt


def autocast(device, args):
    if args.mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16)


def bare(recipe, cfg, meta, cols, args, per_batch: bool = False) -> float:
    """Normalized tensors on the device (or uint8 ones normalized per batch); a random permutation
    sliced per step."""
    device, steps = torch.device(args.device), args.steps
    batch = {k: v.to(device) for k, v in cols.items()}
    if not per_batch:
        batch = recipe.transform(batch, False, meta)  # normalize once, outside the timed loop
    model, forward, opt = make_model(recipe, cfg, meta, device, args)
    loss_fn, inputs = pipeline_recipe.loss_fn(recipe, cfg), pipeline_recipe.model_inputs(recipe, cfg)
    scaler = torch.amp.GradScaler(enabled=args.mixed_precision == "fp16")
    bs, n = cfg.trainer.batch_size, len(batch["label"])
    order = torch.randperm(n, device=device)

    def step(i):
        idx = order[(i * bs) % (n - bs + 1) :][:bs]
        b = {k: v.index_select(0, idx) for k, v in batch.items()}
        if per_batch:
            b = recipe.transform(b, True, meta)
        with autocast(device, args):
            loss = loss_fn(forward(*(b[k] for k in inputs)), b)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, bs, device)


def tutorial(recipe, cfg, args) -> float:
    """The tutorials' loop: a torchvision dataset decoding PIL images per sample, ToTensor, DataLoader."""
    device, steps = torch.device(args.device), args.steps
    from torchvision import datasets as tv
    from torchvision import transforms

    cls = tv.FashionMNIST if recipe.name.startswith("fashion") else tv.MNIST
    norm = [transforms.Normalize((0.5,), (0.5,))] if recipe.name == "mnist_mlp" else []
    # torchvision's dataset reads unpacked IDX files; the pipeline never unpacks into the data folder, so
    # the bench does, into its own temporary folder.
    root = Path(cfg.data.cache_dir).parent / "tutorial-raw"
    raw = root / cls.__name__ / "raw"
    if not raw.exists():
        raw.mkdir(parents=True)
        for path in recipe.raw_files(cfg):
            with (
                (gzip.open if path.suffix == ".gz" else open)(path, "rb") as src,
                open(raw / path.name.removesuffix(".gz"), "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
    ds = cls(str(root), train=True, download=False, transform=transforms.Compose([transforms.ToTensor(), *norm]))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.trainer.batch_size, shuffle=True, drop_last=True)
    model, forward, opt = make_model(recipe, cfg, {}, device, args)
    loss_fn = pipeline_recipe.loss_fn(recipe, cfg)
    scaler = torch.amp.GradScaler(enabled=args.mixed_precision == "fp16")
    it = iter(loader)

    def step(i):
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        x, y = x.to(device), y.to(device)
        with autocast(device, args):
            loss = loss_fn(forward(x), {"label": y})
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, cfg.trainer.batch_size, device)


def timed(step, steps: int, batch: int, device) -> float:
    """As the loop's Speed: warm-up (and compilation) untimed, the clock read after a sync."""
    for i in range(WARMUP_STEPS):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + WARMUP_STEPS)
    sync()
    return steps * batch / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
