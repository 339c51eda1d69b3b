"""Cluster launchers: the exact commands the Slurm and Kubernetes scripts run (via DRY_RUN=1 and fake
srun/scontrol), the accelerate configs as accelerate reads them, the PyTorchJob, the Dockerfile.

pytest -q tests/test_cluster.py
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SBATCH = "launch/slurm/train.sbatch"
K8S = "launch/k8s/launch.sh"
OVERRIDES = ["recipe=mnist_cnn", "trainer.epochs=2", "trainer.batch_size=128"]
EXPECTED_PIP = ["pip install torch==2.14.1 torchvision==0.29.1", "pip install ."]

# A fake 2-node Slurm job, seen from node 1.
SLURM_ENV = {
    "SLURM_JOB_ID": "123",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "node7,node8",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_CPUS_PER_TASK": "16",
}
# What the Kubeflow operator sets in the second pod of a 2-pod job.
K8S_ENV = {
    "MASTER_ADDR": "train-master-0",
    "MASTER_PORT": "23456",
    "WORLD_SIZE": "2",
    "RANK": "1",
    "GPUS_PER_NODE": "4",
    "RUN_NAME": "train",
}


def bash(script: str, args: list[str], env: dict, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    """Runs a launcher from the repo root with only PATH and `env` set, so the host's variables cannot leak in."""
    path = os.environ["PATH"] if path_prefix is None else f"{path_prefix}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", script, *args], cwd=ROOT, env={"PATH": path, **env}, capture_output=True, text=True, timeout=30
    )


def dry_run(script: str, args: list[str], env: dict, **kw) -> list[str]:
    result = bash(script, args, {"DRY_RUN": "1", **env}, **kw)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def accelerate_cmd(rank: int, addr: str, port: int, processes: int, args: list[str]) -> str:
    return (
        "python launch/run.py --config_file launch/accelerate/multi_node.yaml --num_machines 2 "
        f"--machine_rank {rank} --main_process_ip {addr} --main_process_port {port} "
        f"--num_processes {processes} launch/train.py {' '.join(args)}"
    )


# ---- Slurm


def test_sbatch_dry_run_prints_prepare_srun_and_this_nodes_accelerate_launch():
    lines = dry_run(SBATCH, OVERRIDES, SLURM_ENV)
    train_args = ["run_name=slurm-123", *OVERRIDES]
    # --cpus-per-task passed on: srun in Slurm 22.05-23.02 does not inherit it from the job.
    assert lines == [
        f"srun --nodes=1 --ntasks=1 --cpus-per-task=16 python launch/prepare.py {' '.join(OVERRIDES)}",
        f"srun --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 bash {SBATCH} --node {' '.join(train_args)}",
        accelerate_cmd(1, "node7", 20123, 8, train_args),  # port: 20000 + job id % 10000
    ]
    # A job submitted without --cpus-per-task has none to pass on: srun's own default.
    env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_CPUS_PER_TASK"}
    assert "--cpus-per-task" not in " ".join(dry_run(SBATCH, OVERRIDES, env))


@pytest.mark.parametrize("script, env", [(SBATCH, SLURM_ENV), (K8S, K8S_ENV)])
def test_dry_run_quotes_arguments_so_they_can_be_pasted(script, env):
    lines = dry_run(script, ["data.root=/shared/my data", "optimizer.name=$HOME"], env)
    for line in lines:
        assert shlex.split(line)[-2:] == ["data.root=/shared/my data", "optimizer.name=$HOME"]


def test_sbatch_dry_run_overrides_and_errors():
    env = {
        **SLURM_ENV,
        "SLURM_JOB_NODELIST": "node[7-8]",
        "MAIN_ADDR": "10.0.0.7",
        "MAIN_PORT": "29500",
        "GPUS_PER_NODE": "2",
        "RUN_NAME": "mine",
    }
    assert dry_run(SBATCH, ["recipe=digits"], env)[-1] == accelerate_cmd(
        1, "10.0.0.7", 29500, 4, ["run_name=mine", "recipe=digits"]
    )
    # A bracketed node list needs scontrol, which a dry run must not use: a clear error instead.
    result = bash(SBATCH, [], {"DRY_RUN": "1", **SLURM_ENV, "SLURM_JOB_NODELIST": "node[7-8]"})
    assert result.returncode == 2 and "MAIN_ADDR" in result.stderr
    result = bash(SBATCH, [], {"DRY_RUN": "1"})  # not inside a job
    assert result.returncode != 0 and "sbatch" in result.stderr


def fake_sbatch(tmp_path, train_exit: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The real (not dry) path with fake srun/scontrol/python that log their arguments; the training
    step ends with `train_exit`. Returns the result and the logged commands."""
    log = tmp_path / "log"
    fakes = {
        # srun: log, then run the command once per node (as Slurm does with --ntasks-per-node=1)
        # for the training step, once for the prepare step.
        "srun": 'echo "srun $*" >> "$LOG"; while [[ "$1" == --* ]]; do shift; done\n'
        'if [[ " $* " == *" --node "* ]]; then n=$SLURM_NNODES; else n=1; fi\n'
        'for ((i = 0; i < n; i++)); do SLURM_NODEID=$i "$@" || exit; done',
        "scontrol": 'if [[ "$1 $2 $3" == "show hostnames node[7-8]" ]]; then printf "node7\\nnode8\\n"; '
        'else echo "scontrol $*" >> "$LOG"; fi',
        # The training step ends with TRAIN_EXIT (launch/run.py passes the training's code on).
        "python": 'echo "python $*" >> "$LOG"; [[ "$1" != launch/run.py ]] || exit "${TRAIN_EXIT:-0}"',
    }
    for name, body in fakes.items():
        (tmp_path / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {
        **SLURM_ENV,
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "node[7-8]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "LOG": str(log),
        "TRAIN_EXIT": str(train_exit),
    }
    result = bash(SBATCH, ["recipe=digits"], env, path_prefix=tmp_path)
    return result, log.read_text().splitlines()


def test_sbatch_runs_prepare_once_then_accelerate_on_every_node(tmp_path):
    result, log = fake_sbatch(tmp_path)
    assert result.returncode == 0, result.stderr
    train = "run_name=slurm-123 recipe=digits"
    assert log == [
        "srun --nodes=1 --ntasks=1 --cpus-per-task=16 python launch/prepare.py recipe=digits",
        "python launch/prepare.py recipe=digits",
        f"srun --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 bash {SBATCH} --node {train}",
        accelerate_cmd(0, "node7", 20123, 8, train.split()),
        accelerate_cmd(1, "node7", 20123, 8, train.split()),
    ]


@pytest.mark.parametrize("code", [143, 2, 3, 1])
def test_sbatch_requeues_a_run_stopped_on_sigterm_only(tmp_path, code):
    # 143: SIGTERM (time-limit warning or preemption), checkpoint saved -> requeue; the rest are final.
    result, log = fake_sbatch(tmp_path, train_exit=code)
    assert result.returncode == code
    assert ("scontrol requeue 123" in log) == (code == 143), log
    assert ("requeueing" in result.stdout) == (code == 143)


def test_sbatch_directives():
    text = (ROOT / SBATCH).read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    for wanted in ["--ntasks-per-node=1", "--signal=TERM@300", "--requeue"]:
        assert wanted in directives
    assert any(d.startswith("--gpus-per-node=") for d in directives)
    # sbatch stops reading #SBATCH lines at the first command.
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(text.splitlines().index(f"#SBATCH {d}") < first_command for d in directives)


# ---- Kubernetes


def test_k8s_launch_dry_run():
    assert dry_run(K8S, OVERRIDES, K8S_ENV) == [
        accelerate_cmd(1, "train-master-0", 23456, 8, ["run_name=train", *OVERRIDES])
    ]
    # Rank 0 builds the shards first, once for the job; PREPARE=0 skips that.
    lines = dry_run(K8S, ["recipe=digits"], {**K8S_ENV, "RANK": "0"})
    assert lines == [
        "python launch/prepare.py recipe=digits",
        accelerate_cmd(0, "train-master-0", 23456, 8, ["run_name=train", "recipe=digits"]),
    ]
    assert len(dry_run(K8S, ["recipe=digits"], {**K8S_ENV, "RANK": "0", "PREPARE": "0"})) == 1


def test_k8s_launch_prefers_pod_count_and_counts_gpus(tmp_path):
    # Newer operators: WORLD_SIZE = pods * nprocPerNode, PET_NNODES / PET_NODE_RANK = pods / pod index.
    env = {**K8S_ENV, "WORLD_SIZE": "16", "PET_NNODES": "2", "PET_NODE_RANK": "1"}
    assert dry_run(K8S, [], env)[-1] == accelerate_cmd(1, "train-master-0", 23456, 8, ["run_name=train"])
    # Without GPUS_PER_NODE: the nvidia-smi count, else 1.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/bash\nprintf 'GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\nGPU 2: H100 (UUID: c)\\n'\n")
    smi.chmod(0o755)
    env = {k: v for k, v in K8S_ENV.items() if k != "GPUS_PER_NODE"}
    assert "--num_processes 6 " in dry_run(K8S, [], env, path_prefix=tmp_path)[-1]
    smi.write_text("#!/bin/bash\nexit 9\n")
    assert "--num_processes 2 " in dry_run(K8S, [], env, path_prefix=tmp_path)[-1]


def test_pytorchjob_manifest():
    docs = list(yaml.safe_load_all((ROOT / "launch/k8s/pytorchjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1
    master, worker = (specs[r]["template"]["spec"] for r in ("Master", "Worker"))
    assert master == worker  # same image, command, env, volumes: only the replica counts differ
    (container,) = master["containers"]
    assert container["name"] == "pytorch"  # the operator only configures this container
    assert container["command"] == ["bash", K8S] and (ROOT / K8S).exists()
    assert {"data.root=/data", "data.cache_dir=/cache", "output_dir=/runs"} <= set(container["args"])
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/data", "/cache", "/runs"}
    env = {e["name"]: e for e in container["env"]}
    assert "value" not in env["WANDB_API_KEY"]
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    assert env["GPUS_PER_NODE"]["value"] == str(container["resources"]["limits"]["nvidia.com/gpu"])
    assert env["RUN_NAME"]["value"] == job["metadata"]["name"]
    assert any(p["name"] == "pytorchjob-port" for p in container["ports"])
    # Exit 143 (stopped on SIGTERM, checkpoint saved) restarts the pod; 1, 2, 3 fail the job. The pod
    # gets longer to save than torch's launcher waits (launch.sh's TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
    assert {specs[r]["restartPolicy"] for r in specs} == {"ExitCode"}
    timeout = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", (ROOT / K8S).read_text())[1])
    assert master["terminationGracePeriodSeconds"] > timeout


# ---- accelerate configs

CONFIGS = {  # file: (distributed_type, num_machines, num_processes, mixed_precision, use_cpu)
    "cpu": ("MULTI_GPU", 1, 1, "no", True),  # MULTI_GPU: the launcher that starts N processes (gloo on CPUs)
    "single_gpu": ("NO", 1, 1, "no", False),
    "bf16": ("NO", 1, 1, "bf16", False),
    "multi_gpu": ("MULTI_GPU", 1, 8, "no", False),
    "multi_node": ("MULTI_GPU", 2, 16, "no", False),
}


def test_every_yaml_under_launch_parses():
    files = sorted((ROOT / "launch").rglob("*.y*ml"))
    assert {f.stem for f in files} >= {*CONFIGS, "pytorchjob"}
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_config_loads_with_accelerates_own_class(name):
    from accelerate.commands.config.config_args import ClusterConfig

    # from_yaml_file rejects unknown keys, so this also checks the field names against this accelerate.
    cfg = ClusterConfig.from_yaml_file(str(ROOT / f"launch/accelerate/{name}.yaml"))
    got = (cfg.distributed_type.value, cfg.num_machines, cfg.num_processes, cfg.mixed_precision, cfg.use_cpu)
    assert got == CONFIGS[name]
    assert cfg.main_process_ip is None  # never a baked-in address


def launch_args(command: str):
    """`accelerate launch ...` as `accelerate launch` itself resolves it (the command-line flags over the file)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = shlex.split(command)
    assert argv[:2] in (["accelerate", "launch"], ["python", "launch/run.py"])  # run.py takes the same options
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
    return args


def test_accelerate_reads_the_launchers_commands():
    args = launch_args(dry_run(SBATCH, OVERRIDES, SLURM_ENV)[-1])
    assert (args.multi_gpu, args.num_machines, args.machine_rank, args.num_processes) == (True, 2, 1, 8)
    assert (args.main_process_ip, args.main_process_port) == ("node7", 20123)
    assert args.training_script == "launch/train.py"
    assert args.training_script_args == ["run_name=slurm-123", *OVERRIDES]
    args = launch_args(dry_run(K8S, OVERRIDES, K8S_ENV)[-1])
    assert (args.num_machines, args.machine_rank, args.num_processes, args.main_process_ip) == (
        2,
        1,
        8,
        "train-master-0",
    )


@pytest.mark.parametrize(
    "name, multi_gpu, processes, precision",
    [
        ("cpu", True, 1, "no"),
        ("bf16", False, 1, "bf16"),
        ("multi_gpu", True, 8, "no"),
    ],
)
def test_accelerate_launch_with_each_config(name, multi_gpu, processes, precision):
    args = launch_args(f"accelerate launch --config_file launch/accelerate/{name}.yaml launch/train.py")
    assert (args.multi_gpu, args.num_processes, args.mixed_precision) == (multi_gpu, processes, precision)
    assert (
        launch_args(
            f"accelerate launch --config_file launch/accelerate/{name}.yaml --num_processes 2 launch/train.py"
        ).num_processes
        == 2
    )


# ---- Docker


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[0].upper(), m[1].strip()) for m in re.findall(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def pip_lines(commands: list[str]) -> list[str]:
    """The `pip install ...` commands, normalised: `-e`/`--editable` dropped, spaces collapsed."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;|\|\|", command):
            words = [w for w in part.split("#")[0].split() if w not in ("-e", "--editable")]
            if words[:2] == ["pip", "install"]:
                found.append(" ".join(words))
    return found


def test_dockerfile():
    steps = instructions((ROOT / "Dockerfile").read_text())
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for op, args in steps:
        assert not (op in ("ARG", "ENV") and "WANDB_API_KEY" in args), "the W&B key must come from the run's env"
    volumes = [args for op, args in steps if op == "VOLUME"]
    assert volumes and {"/data", "/cache", "/runs"} <= set(re.findall(r"/\w+", " ".join(volumes)))
    # launch/run.py as PID 1: it passes SIGTERM on (accelerate's launcher as PID 1 drops it) and keeps exit codes.
    assert [args for op, args in steps if op == "ENTRYPOINT"] == ['["python", "launch/run.py"]']
    (cmd,) = [yaml.safe_load(args) for op, args in steps if op == "CMD"]
    assert cmd[0] == "launch/train.py"
    assert {"data.root=/data", "data.cache_dir=/cache", "output_dir=/runs"} <= set(cmd[1:])
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim") and steps[1] == ("FROM", "${BASE_IMAGE}")
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert re.search(r"apt-get install .*\bgcc\b.*\bg\+\+", runs), "torch.compile needs a C/C++ compiler"
    # Any uid in group 0 (OpenShift, Kubernetes runAsUser) writes HOME, the caches and the working directory.
    env = " ".join(args for op, args in steps if op == "ENV")
    for var in (
        "HOME",
        "XDG_CACHE_HOME",
        "MPLCONFIGDIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "HF_HOME",
        "WANDB_DATA_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_CONFIG_DIR",
    ):
        assert re.search(rf"\b{var}=", env), f"{var} is not set in the image"
    assert re.search(r"chown -R 1000:0 /app \"\$HOME\"", runs) and re.search(r"chmod -R g=u /app \"\$HOME\"", runs)


def test_dockerfile_installs_like_the_readme():
    docker = pip_lines([args for op, args in instructions((ROOT / "Dockerfile").read_text()) if op == "RUN"])
    readme = ROOT / "README.md"
    documented = (
        pip_lines([line.strip().removeprefix("$ ") for line in readme.read_text().splitlines()])
        if readme.exists()
        else []
    )
    if not documented:  # README not written yet: hold the Dockerfile to the agreed lines
        documented = EXPECTED_PIP
    assert docker, "no pip install in the Dockerfile"
    assert set(docker) <= set(documented), f"Dockerfile {docker} vs README {documented}"
    pinned = [line for line in documented if "torch==" in line]
    assert pinned and set(pinned) <= set(docker)


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {
        line.strip().strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "runs", "data", "wandb", "**/__pycache__"} <= ignored
    assert not ignored & {"launch", "pipeline", "recipes", "pyproject.toml", "README.md", "*.py", "*.md"}
    assert {"build", "**/*.egg-info", "tests"} <= ignored  # a stale build/ would be installed instead of the sources


def test_container_check_is_valid_bash_and_runs_every_check_it_defines():
    script = ROOT / "launch" / "container_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    (listed,) = re.findall(r"^CHECKS=\((.*)\)$", text, re.M)
    defined = re.findall(r"^check_(\w+)\(\)", text, re.M)
    assert sorted(listed.split()) == sorted(defined)
    assert {
        "default",
        "readonly_data",
        "bind_runs",
        "other_uid",
        "stop_1",
        "stop_2",
        "compile",
        "small_shm",
        "two_machines",
    } <= set(defined)


# ---- all of the files

CLUSTER_FILES = [
    "Dockerfile",
    ".dockerignore",
    SBATCH,
    K8S,
    "launch/k8s/pytorchjob.yaml",
    "launch/CLUSTER.md",
    *(f"launch/accelerate/{n}.yaml" for n in CONFIGS),
]


def test_no_secret_in_any_file():
    for name in CLUSTER_FILES:
        text = (ROOT / name).read_text()
        assert not re.search(r"\b[0-9a-f]{40}\b", text), f"{name} holds something shaped like a W&B key"
        assert not re.search(r"WANDB_API_KEY\s*=\s*['\"]?\w", text), f"{name} sets WANDB_API_KEY to a value"


@pytest.mark.parametrize("script", [SBATCH, K8S])
def test_scripts_are_valid_bash_and_say_what_they_are(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
    head = (ROOT / script).read_text().splitlines()
    assert head[0] == "#!/bin/bash" and head[1].startswith("# ") and script in "\n".join(head[:12])


# ---- what a scheduler sees: exit codes and messages of launch/run.py (and of plain `accelerate launch`)


def launched(tmp_path, processes: int, *args: str, launcher: str = "run") -> subprocess.CompletedProcess:
    from conftest import cli, common

    return cli(common(tmp_path, *args), cwd=tmp_path, processes=processes, launcher=launcher, timeout=300)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_config_error_exits_2_with_one_message(tmp_path, processes):
    result = launched(tmp_path, processes, "trainer.nope=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error: unknown config key 'trainer.nope'") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert result.stderr.strip().count("\n") <= 1, result.stderr  # nothing but the message


@pytest.mark.slow
def test_an_error_in_a_main_process_step_stops_every_process(tmp_path):
    # Publishing a checkpoint is the main process's alone; its refusal (a person's folder where the
    # checkpoint goes) reaches the other process, which would otherwise wait in the next collective until
    # the distributed timeout (trainer.dist_timeout_s, 30 minutes by default) and exit with an abort code.
    import time

    in_the_way = tmp_path / "runs" / "digits" / "job" / "checkpoints" / "step-00000001"
    in_the_way.mkdir(parents=True)
    (in_the_way / "notes.txt").write_text("mine")
    started = time.time()
    result = launched(tmp_path, 2, "run_name=job", "trainer.epochs=1", "checkpoint.every_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("is in the way of the checkpoint of that step") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert time.time() - started < 120
    assert (in_the_way / "notes.txt").read_text() == "mine"  # a person's files stay


@pytest.mark.slow
def test_plain_accelerate_launch_hides_the_exit_code(tmp_path):
    # What run.py is for: Accelerate 1.15 turns every failure into exit 1, with torch's ChildFailedError
    # traceback after our message (several processes) or CalledProcessError (one process, without -q).
    two = launched(tmp_path, 2, "trainer.nope=1", launcher="accelerate")
    assert two.returncode == 1 and "ChildFailedError" in two.stderr
    assert two.stderr.count("error: unknown config key 'trainer.nope'") == 1


def sigterm_after_first_log_line(tmp_path, processes: int) -> subprocess.CompletedProcess:
    """Starts a long run under launch/run.py, sends SIGTERM to the launcher alone (as Kubernetes does
    to a pod's PID 1) once a train/loss line is logged, and returns how it ended."""
    import signal
    import time

    from conftest import command, common, environment

    args = common(tmp_path, "trainer.epochs=100", "trainer.log_every=5", "run_name=job")
    proc = subprocess.Popen(
        command(args, processes, launcher="run"),
        cwd=tmp_path,
        env=environment(processes),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "runs" / "digits" / "job" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_the_launcher_saves_and_exits_143(tmp_path, processes):
    from pipeline import checkpoint

    result = sigterm_after_first_log_line(tmp_path, processes)
    run_dir = tmp_path / "runs" / "digits" / "job"
    assert result.returncode == 143, result.stderr[-3000:]
    assert result.stderr.count("stopped on SIGTERM after step") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert checkpoint.latest(run_dir) and not (run_dir / "summary.json").exists()
