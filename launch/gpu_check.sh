#!/usr/bin/env bash
# Proves the GPU paths on a CUDA host in about 10 minutes, without network: one line per check with its
# figure, then a summary; exits 1 if any check failed (2 if it cannot start).
#
#   bash launch/gpu_check.sh                          # from the repo root, on a host with 1+ GPUs
#   GPU_CHECK_ALLOW_CPU=1 bash launch/gpu_check.sh    # the same checks, small, on the CPU (tests this script)
#   bash launch/gpu_check.sh compile_bf16 load_weights   # only these of: compile_bf16 load_weights bench
#                                                       # sigterm_resume pytest_gpu ddp_one_vs_two
#                                                       # dropout_ranks resume_layout resnet50_224
#
# Checks: compile + bf16 on mnist_cnn (recompiles counted); its weights load into an uncompiled model;
# launch/bench.py on mnist_mlp and mnist_cnn with the data on the GPU and in host memory, and --device cpu
# on the GPU host; fp16 from host memory stopped by SIGTERM and resumed; `pytest -m gpu`; with 2+ GPUs,
# mnist_mlp on 1 and 2 processes, each process's own dropout masks, and a dropout run killed on 1 machine x
# 2 GPUs and resumed on 2 machines x 1 GPU; resnet50 on 224 px photos (image_folder, center crop, random_resized_crop
# on the device). Data: MNIST's test set from tests/data/mnist-test (or
# ../shared/data), written as both the train and the test files, and tests/data/water-potability.
# PYTHON= picks the interpreter (default .venv/bin/python).
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
WORK=$(mktemp -d -t gpu-check-XXXXXX)
export TQDM_DISABLE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    # Small on the CPU: the same commands, fewer steps, no accuracy bar, no GPU-only checks.
    DEVICE=cpu SMALL=1 GPUS=0 MIN_ACCURACY=0 BENCH_STEPS=20 REPEATS=1 EPOCHS=3
    export CUDA_VISIBLE_DEVICES=""
elif [ "$GPUS" -ge 1 ]; then
    DEVICE=cuda SMALL=0 MIN_ACCURACY=0.9 BENCH_STEPS=400 REPEATS=2 EPOCHS=30  # EPOCHS: long enough to stop
else
    echo "error: no CUDA device (torch.cuda.device_count() is 0 with $PY); run this on a GPU host," \
         "or set GPU_CHECK_ALLOW_CPU=1 to run the checks small on the CPU" >&2
    exit 2
fi

MNIST=tests/data/mnist-test
[ -d "$MNIST" ] || MNIST=../shared/data/mnist-test
if [ ! -f "$MNIST/t10k-images-idx3-ubyte.gz" ]; then
    echo "error: MNIST test files not found in tests/data/mnist-test or ../shared/data/mnist-test" >&2
    exit 2
fi
mkdir -p "$WORK/data/MNIST/raw"
for kind in images-idx3 labels-idx1; do
    for split in train t10k; do cp "$MNIST/t10k-$kind-ubyte.gz" "$WORK/data/MNIST/raw/$split-$kind-ubyte.gz"; done
done
RUNS=$WORK/runs
TRAIN=("$PY" launch/train.py "data.root=$WORK/data" "output_dir=$RUNS" "data.cache_dir=$WORK/cache" tracking=none)

# The figures, read from the runs' own outputs; each exits non-zero when its check fails.
cat >"$WORK/figures.py" <<'EOF'
import json
import sys
from pathlib import Path

def read(path):
    return json.loads(Path(path).read_text())

def compiled(summary, recompiles, min_accuracy):
    s = read(summary)
    print(f"eval/accuracy {s['eval/accuracy']:.4f}, {s['train/samples_per_s']:,.0f} samples/s, first step "
          f"{s['time/first_step_s']:.1f} s, compile={s['compile']}, {s['mixed_precision']}, recompiles {recompiles}")
    # One recompile is the eval graph (no grad); the ragged last eval batch may add one.
    return s["compile"] is True and s["mixed_precision"] == "bf16" and s["eval/accuracy"] >= float(min_accuracy) \
        and int(recompiles) <= 2

def load_weights(run, *overrides):
    import torch
    from safetensors.torch import load_file

    from pipeline import cli, shard_store, tensor_rows

    weights = load_file(Path(run) / "model.safetensors")
    wrapped = [k for k in weights if "_orig_mod." in k]
    if wrapped:
        print(f"keys carry torch.compile's prefix: {', '.join(wrapped[:2])} ...")
        return False
    recipe, cfg = cli.parse(list(overrides))
    splits, meta = shard_store.open_shards(shard_store.shards_dir(recipe, cfg))
    model = recipe.model(cfg, meta)
    model.load_state_dict(weights, strict=True)  # every key, nothing extra
    test, right = tensor_rows.columns(splits["test"]), 0
    with torch.no_grad():
        for start in range(0, len(test["label"]), 1000):
            batch = recipe.transform({k: v[start:start + 1000] for k, v in test.items()}, False, meta)
            right += (model.eval()(batch["image"]).argmax(1) == batch["label"]).sum().item()
    accuracy = right / len(test["label"])
    expected = read(Path(run) / "summary.json")["test/accuracy"]
    print(f"{len(weights)} tensors, test accuracy {accuracy:.4f} uncompiled fp32 vs {expected:.4f} in the run")
    return abs(accuracy - expected) <= 0.01

def bench(report, device):
    r = read(report)
    x = r["samples_per_s"]
    print(f"{r['device']}: pipeline {x['pipeline']:,.0f} samples/s, x{r['ratios']['pipeline/bare']:.2f} bare, "
          f"x{r['ratios']['pipeline/bare_u8']:.2f} bare_u8, x{r['ratios']['pipeline/tutorial']:.2f} tutorial; "
          f"streamed {x['pipeline_stream']:,.0f}, x{r['ratios']['pipeline_stream/pipeline']:.2f} pipeline")
    return r["device"] == device

def same_run(a, b, label_a, label_b):
    a, b = read(a), read(b)
    print(f"steps {a['steps']}/{b['steps']}, eval/loss {a['eval/loss']:.5f} {label_a} vs {b['eval/loss']:.5f} {label_b}")
    return a["steps"] == b["steps"] and abs(a["eval/loss"] - b["eval/loss"]) <= 1e-3 * b["eval/loss"]

def masks(log):
    line = next(x for x in Path(log).read_text().splitlines() if x.startswith("processes "))
    words = line.split()
    agreement, dropped = float(words[5]), float(words[7])
    print(f"{words[1]} processes on {words[3]}: masks agree at {agreement:.3f} of positions (independent: ~0.5, "
          f"one stream: 1.0), {dropped:.3f} dropped")
    return words[1] == "2" and 0.4 < agreement < 0.6 and 0.4 < dropped < 0.6

def descendants(pid):
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found

def interrupt(log, run, min_step, *command):
    """Runs `command` and SIGKILLs it and every process it started (torchrun starts its workers in sessions of
    their own), as a lost node, once `run` has a checkpoint of `min_step` or later."""
    import os
    import signal
    import subprocess
    import time

    with open(log, "a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    saved, deadline = [], time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        saved = sorted(Path(run).glob("checkpoints/step-*/trainer_state.json"))
        if saved and int(saved[-1].parent.name.removeprefix("step-")) >= int(min_step):
            break
        time.sleep(0.005)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    saved = sorted(Path(run).glob("checkpoints/step-*/trainer_state.json"))
    print(f"killed after {saved[-1].parent.name}" if saved else "killed before any checkpoint")
    return bool(saved) and not (Path(run) / "summary.json").exists()

def photos(folder, per_class):
    """<folder>/<circle|square>/*.jpg: 320x256 noisy photos of one light shape, placed at random."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for shape in ("circle", "square"):
        (Path(folder) / shape).mkdir(parents=True, exist_ok=True)
        for i in range(int(per_class)):
            image = Image.fromarray(rng.integers(0, 60, (256, 320, 3), dtype=np.uint8))
            r, x, y = (int(v) for v in rng.integers((40, 60, 60), (80, 260, 196)))
            box = [x - r, y - r, x + r, y + r]
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=(220, 220, 220))
            image.save(Path(folder) / shape / f"{i:04d}.jpg")
    return True

def large_images(summary, min_accuracy):
    s = read(summary)
    print(f"resnet50 224 px: {s['steps']} steps, {s['train/samples_per_s']:,.0f} samples/s, eval/accuracy "
          f"{s['eval/accuracy']:.3f}, compile={s['compile']}, {s['mixed_precision']}")
    return s["steps"] > 0 and s["eval/accuracy"] >= float(min_accuracy)

def same_weights(a, b, label_a, label_b):
    from safetensors.torch import load_file

    a, b = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in b)
    print(f"{len(b)} tensors, weights {label_a} vs {label_b} differ by up to {worst:.2e}")
    return sorted(a) == sorted(b) and worst < 1e-4

try:
    passed = globals()[sys.argv[1]](*sys.argv[2:])
except Exception as e:  # a missing file or key: the check failed, and says how
    print(f"{type(e).__name__}: {e}")
    passed = False
sys.exit(0 if passed else 1)
EOF
figure() { PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$PY" "$WORK/figures.py" "$@" 2>>"$WORK/figures.log" | tail -n 1; return "${PIPESTATUS[0]}"; }

PASSED=0 FAILED=0 SKIPPED=0
FAILED_NAMES=()
report() {  # report NAME STATUS FIGURE: one line; a failure shows the end of its log
    if [ "$2" -eq 0 ]; then
        PASSED=$((PASSED + 1)); printf 'PASS  %-26s %s\n' "$1" "$3"
    else
        FAILED=$((FAILED + 1)); FAILED_NAMES+=("$1")
        printf 'FAIL  %-26s %s\n' "$1" "$3"
        tail -n 12 "$WORK/$1.log" 2>/dev/null | sed 's/^/      | /'
    fi
}
skip() { SKIPPED=$((SKIPPED + 1)); printf 'SKIP  %-26s %s\n' "$1" "$2"; }
limited() {  # limited NAME SECONDS COMMAND...: appends the command's output to NAME.log; 124 on timeout
    local name=$1 seconds=$2
    shift 2
    timeout --kill-after=15 "$seconds" "$@" >>"$WORK/$name.log" 2>&1
    local status=$?
    [ $status -eq 124 ] && echo "timed out after $seconds s: $*" >>"$WORK/$name.log"
    return $status
}

ONLY=" $* "  # check names on the command line: run only those (load_weights needs compile_bf16)
want() { [ "$ONLY" = "  " ] || [[ $ONLY == *" $1 "* ]]; }

echo "gpu_check: device=$DEVICE gpus=$GPUS python=$PY work=$WORK"

# ---- 1. compile + bf16 on mnist_cnn: trains, and recompiles no more than evaluation needs
if want compile_bf16; then
    few=(); [ "$SMALL" = 1 ] && few=(trainer.max_steps=10)
    TORCH_LOGS=recompiles ACCELERATE_MIXED_PRECISION=bf16 limited compile_bf16 600 "${TRAIN[@]}" recipe=mnist_cnn \
        run_name=compiled trainer.compile=true trainer.epochs=1 "${few[@]}"
    status=$?
    recompiles=$(grep -c "Recompiling function" "$WORK/compile_bf16.log")
    line=$(figure compiled "$RUNS/mnist_cnn/compiled/summary.json" "$recompiles" "$MIN_ACCURACY") || status=1
    report compile_bf16 $status "$line"
fi

# ---- 2. the compiled run's weights load into an uncompiled model and score as in its summary
if want load_weights; then
    line=$(figure load_weights "$RUNS/mnist_cnn/compiled" recipe=mnist_cnn "${TRAIN[@]:2}")
    report load_weights $? "$line"
fi

# ---- 3. bench: every path on the one device, the pipeline's data on the GPU and in host memory
if want bench; then
    bench() {  # bench NAME DEVICE STEPS ARGS...
        local name=$1 device=$2 steps=$3
        shift 3
        limited "$name" 600 "$PY" launch/bench.py --data-root "$WORK/data" --device "$device" --steps "$steps" \
            --repeats "$REPEATS" --json "$WORK/$name.json" "$@"
        local status=$? line
        line=$(figure bench "$WORK/$name.json" "$device") || status=1
        report "$name" $status "$line"
    }
    if [ "$DEVICE" = cuda ]; then
        for recipe in mnist_mlp mnist_cnn; do
            for on_device in true false; do
                bench "bench_${recipe}_on_device_$on_device" cuda "$BENCH_STEPS" --recipe $recipe --on-device $on_device
            done
        done
        # --device cpu on a GPU host: every path, the pipeline's too, on the CPU (bench stops otherwise).
        bench bench_device_cpu_on_gpu_host cpu 20 --recipe mnist_mlp
    else
        bench bench_mnist_mlp_host cpu "$BENCH_STEPS" --recipe mnist_mlp --on-device false
    fi
fi

# ---- 4. fp16 from host memory: SIGTERM stops it at a log line with a checkpoint; the same command resumes
if want sigterm_resume; then
    precision=fp16
    if [ "$DEVICE" = cpu ] && ! ACCELERATE_MIXED_PRECISION=fp16 "$PY" -c "import accelerate; accelerate.Accelerator()" \
            >/dev/null 2>&1; then
        precision=bf16  # Accelerate refuses fp16 on a CPU
    fi
    resume=(recipe=mnist_mlp "trainer.epochs=$EPOCHS" trainer.log_every=10 checkpoint.every_steps=20 data.on_device=false)
    export ACCELERATE_MIXED_PRECISION=$precision
    limited sigterm_resume 300 "${TRAIN[@]}" "${resume[@]}" run_name=whole
    whole=$?
    "${TRAIN[@]}" "${resume[@]}" run_name=stopped >>"$WORK/sigterm_resume.log" 2>&1 &
    pid=$!
    for _ in $(seq 1200); do  # up to 60 s for the first checkpoint
        ls "$RUNS"/mnist_mlp/stopped/checkpoints/step-*/trainer_state.json >/dev/null 2>&1 && break
        kill -0 $pid 2>/dev/null || break
        sleep 0.05
    done
    kill -TERM $pid 2>/dev/null
    wait $pid
    stopped=$?
    stop=$(grep -o "stopped on SIGTERM after step [0-9]*" "$WORK/sigterm_resume.log" | head -n 1)
    limited sigterm_resume 300 "${TRAIN[@]}" "${resume[@]}" run_name=stopped
    resumed=$?
    unset ACCELERATE_MIXED_PRECISION
    if [ $whole -eq 0 ] && [ $stopped -eq 143 ] && [ -n "$stop" ] && [ $resumed -eq 0 ] \
            && grep -q "resuming from" "$WORK/sigterm_resume.log"; then
        line=$(figure same_run "$RUNS/mnist_mlp/stopped/summary.json" "$RUNS/mnist_mlp/whole/summary.json" resumed \
            uninterrupted)
        report sigterm_resume $? "$precision, data in host memory, ${stop#stopped on SIGTERM }; $line"
    else
        report sigterm_resume 1 "exit codes: whole $whole, stopped $stopped (143 expected), resumed $resumed; ${stop:-no stop}"
    fi
fi

# ---- 5. the tests marked gpu (they skip, saying why, where CUDA or a second GPU is missing)
if want pytest_gpu; then
    # Only the files that hold gpu tests: collecting the others needs every test dependency (wandb, ...).
    limited pytest_gpu 480 "$PY" -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py)
    status=$?
    counts=$(tail -n 1 "$WORK/pytest_gpu.log")
    [ $status -eq 5 ] && counts="no tests marked gpu"
    # With 2+ GPUs nothing may skip: a skipped test is a path not proven.
    if [ "$GPUS" -ge 2 ] && grep -q "skipped" <<<"$counts"; then status=1; fi
    report pytest_gpu $status "$counts"
fi

# ---- 6. two processes on two GPUs: the same optimization as one
if want ddp_one_vs_two; then
    if [ "$GPUS" -ge 2 ]; then
        one=(recipe=mnist_mlp trainer.epochs=1)
        limited ddp_one_vs_two 300 "${TRAIN[@]}" "${one[@]}" run_name=one
        limited ddp_one_vs_two 300 "$(dirname "$PY")/accelerate" launch --multi_gpu --num_processes 2 --num_machines 1 \
            --mixed_precision no --dynamo_backend no "${TRAIN[@]:1}" "${one[@]}" run_name=two
        status=$?
        line=$(figure same_run "$RUNS/mnist_mlp/two/summary.json" "$RUNS/mnist_mlp/one/summary.json" "on 2 GPUs" \
            "on 1") || status=1
        report ddp_one_vs_two $status "$line"
    else
        skip ddp_one_vs_two "needs 2 GPUs, found $GPUS"
    fi
fi

# Two processes with dropout (water_potability, model.dropout=0.5): on the CPU (small) or 2 GPUs.
WATER=(recipe=water_potability data.root=tests/data/water-potability model.dropout=0.5)
two() {  # two MACHINES RANK DEVICES: TWO, the command start of one machine's share of a 2-process run
    TWO=(env "CUDA_VISIBLE_DEVICES=$3" "PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}" "$(dirname "$PY")/accelerate" launch
         --multi_gpu --num_processes 2 --num_machines "$1" --machine_rank "$2" --main_process_ip 127.0.0.1
         --main_process_port "$PORT" --mixed_precision no --dynamo_backend no)
}
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
PAIR=("" "")  # the devices of the 2 processes: none on the CPU; the first 2 visible GPUs
if [ "$DEVICE" = cuda ]; then
    IFS=, read -r -a PAIR <<<"${CUDA_VISIBLE_DEVICES:-0,1}"
fi
BOTH=${PAIR[0]}${PAIR[1]:+,${PAIR[1]}}

# ---- 7. dropout on 2 processes: each draws its own masks (from one stream every slice got the same ones)
if want dropout_ranks; then
    if [ "$GPUS" -ge 2 ] || [ "$DEVICE" = cpu ]; then
        cat >"$WORK/masks.py" <<'EOF'
import torch
from pipeline import cli, loop

def run(recipe, cfg):
    run = loop.setup(cfg, recipe)
    dropout = next(m for m in run.model.modules() if isinstance(m, torch.nn.Dropout))
    masks = []
    dropout.register_forward_hook(lambda module, args, out: masks.append((out == 0).float()))
    loop.train_step(run, next(iter(run.train_loader)), None)
    both = run.accelerator.gather(masks[0][None])
    run.accelerator.print(f"processes {run.accelerator.num_processes} device {both.device.type} "
                          f"agreement {(both[0] == both[1]).float().mean().item():.3f} "
                          f"dropped {both.mean().item():.3f}")

cli.main("train", "", run)
EOF
        PORT=$(free_port); two 1 0 "$BOTH"
        limited dropout_ranks 300 "${TWO[@]}" "$WORK/masks.py" "${TRAIN[@]:2}" "${WATER[@]}" run_name=masks
        status=$?
        line=$(figure masks "$WORK/dropout_ranks.log") || status=1
        report dropout_ranks $status "$line"
    else
        skip dropout_ranks "needs 2 GPUs, found $GPUS"
    fi
fi

# ---- 8. a dropout run killed on 1 machine x 2 GPUs resumes on 2 machines x 1 GPU (process 1's GPU is then its
# cuda:0) with the uninterrupted run's weights: each process continued its own device's random stream
if want resume_layout; then
    if [ "$GPUS" -ge 2 ] || [ "$DEVICE" = cpu ]; then
        layout=("${TRAIN[@]:1}" "${WATER[@]}" "trainer.epochs=$EPOCHS" checkpoint.every_steps=10 checkpoint.keep=1)
        PORT=$(free_port); two 1 0 "$BOTH"
        limited resume_layout 600 "${TWO[@]}" "${layout[@]}" run_name=whole
        whole=$?
        job=$RUNS/water_potability/job
        PORT=$(free_port); two 1 0 "$BOTH"
        killed=$(figure interrupt "$WORK/resume_layout.log" "$job" 25 "${TWO[@]}" "${layout[@]}" run_name=job)
        interrupted=$?
        PORT=$(free_port); two 2 1 "${PAIR[1]}"
        timeout --kill-after=15 600 "${TWO[@]}" "${layout[@]}" run_name=job >>"$WORK/resume_layout.log" 2>&1 &
        other=$!
        two 2 0 "${PAIR[0]}"
        limited resume_layout 600 "${TWO[@]}" "${layout[@]}" run_name=job
        resumed=$?
        wait $other || resumed=1
        if [ $whole -eq 0 ] && [ $interrupted -eq 0 ] && [ $resumed -eq 0 ] \
                && grep -q "resuming from" "$WORK/resume_layout.log"; then
            line=$(figure same_weights "$job" "$RUNS/water_potability/whole" "resumed on 2x1" "uninterrupted on 1x2")
            report resume_layout $? "$killed; $line"
        else
            report resume_layout 1 "exit codes: whole $whole, resumed $resumed; $killed"
        fi
    else
        skip resume_layout "needs 2 GPUs, found $GPUS"
    fi
fi

# ---- 9. resnet50 on 224 px photos: center-cropped once in prepare, random_resized_crop drawn on the device
if want resnet50_224; then
    per_class=400 size=(trainer.epochs=8 trainer.batch_size=64) accuracy=0.7
    [ "$SMALL" = 1 ] && per_class=6 size=(trainer.max_steps=2 trainer.batch_size=4) accuracy=0
    figure photos "$WORK/photos" "$per_class" >>"$WORK/resnet50_224.log"
    limited resnet50_224 600 "${TRAIN[@]}" recipe=image_folder "data.train_dir=$WORK/photos" data.image_size=224 \
        "data.augment=[random_resized_crop:0.35,hflip]" model.arch=resnet50 run_name=resnet50 "${size[@]}"
    status=$?
    line=$(figure large_images "$RUNS/image_folder/resnet50/summary.json" "$accuracy") || status=1
    report resnet50_224 $status "$line"
fi

echo "gpu_check: $PASSED passed, $FAILED failed, $SKIPPED skipped (device=$DEVICE gpus=$GPUS)"
if [ $FAILED -gt 0 ]; then
    echo "gpu_check: failed: ${FAILED_NAMES[*]}; logs in $WORK"
    exit 1
fi
rm -rf "$WORK"
