"""`accelerate launch` for schedulers: the training's own exit code, and no launcher traceback.

python launch/run.py [accelerate launch options] launch/train.py [key=value ...]

Takes exactly the options of `accelerate launch` (it runs Accelerate's own launcher). Where
`accelerate launch` exits 1 with a traceback after any failure (CalledProcessError for one process,
torch's ChildFailedError or SignalException for several), this exits with the code the training
chose, after the training's one message:
  0 finished | 2 config or data error | 3 loss became NaN/inf | 143 stopped on SIGTERM (checkpoint
  saved: the same command resumes; requeue it) | 130 stopped on SIGINT | 1 anything else (the process's
  traceback above). A process killed by signal N counts as 128+N, as in a shell.

It is the container image's entrypoint: as PID 1 it must pass SIGTERM and SIGINT on itself (the kernel
drops signals PID 1 has no handler for), and wait for the training to save and exit.
Without --config_file (and without an `accelerate config` file), on a host with at most one GPU, it passes
launch/accelerate/default.yaml: one process unless the options say more, and none of Accelerate's warnings
about values it guessed. With several GPUs and no config, Accelerate's own default stays: one process a GPU.
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "accelerate" / "default.yaml"
# Codes whose message the training process already printed: the launcher adds nothing.
EXPLAINED = {0, 2, 3, 128 + signal.SIGTERM, 128 + signal.SIGINT}


def shell_code(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def children() -> list[int]:
    """This process's children (Linux), for forwarding SIGTERM to the one-process launcher's child."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def forward(signum, frame) -> None:
    # Accelerate's one-process launcher would die on the signal and leave the training running unwarned
    # (or, as PID 1, take it down unsaved); the training saves and exits 128+N, which is then reported.
    if signum == signal.SIGINT and terminal_sent_it_to_all():
        return  # Ctrl-C in a terminal reached the training too: a second one would mean "stop at once"
    for pid in children():
        os.kill(pid, signum)


def terminal_sent_it_to_all() -> bool:
    """Whether this process runs in its terminal's foreground group, which Ctrl-C signals as a whole."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY)
    except OSError:  # no controlling terminal: a container, a scheduler, `kill -INT`
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def cpu_processes(args) -> None:
    """`--cpu` (or a config with use_cpu: true) and more than one process: Accelerate 1.15 hands that to its
    one-process launcher, which starts ONE and says nothing. torchrun's launcher starts them all (gloo
    without CUDA). The GPUs are hidden so that a CPU launch stays on the CPU: torchrun's launcher does not
    pass use_cpu on."""
    from accelerate.commands.config import default_config_file, load_config_from_file

    path = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    config = load_config_from_file(path) if path else None
    cpu = args.cpu or bool(getattr(config, "use_cpu", False))
    processes = args.num_processes or getattr(config, "num_processes", None) or 1
    machines = args.num_machines or getattr(config, "num_machines", None) or 1
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if cpu and (processes > 1 or machines > 1):
        args.cpu, args.multi_gpu, args.num_processes = False, True, processes


def quiet_torch_elastic() -> None:
    """torch's launcher logs every worker's failure and shutdown; the workers' own messages (and the
    summary line below) say it once. LOGLEVEL=INFO/WARNING, when set, keeps torch's log as it is."""
    if os.environ.get("LOGLEVEL"):
        return
    import torch.distributed.run  # noqa: F401  (creates the loggers set below)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str]) -> int:
    import torch
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    if args.config_file is None and not os.path.isfile(default_config_file) and torch.cuda.device_count() <= 1:
        # Without a config Accelerate warns that it guessed each value (`--num_processes` ... `0`): say them.
        args.config_file = str(DEFAULT_CONFIG)
    args.quiet = False  # with -q the one-process launcher turns every exit code into 1
    cpu_processes(args)
    quiet_torch_elastic()
    for sig in (signal.SIGTERM, signal.SIGINT):  # torch's launcher installs its own for several processes
        signal.signal(sig, forward)
    try:
        launch_command(args)
        return 0
    except subprocess.CalledProcessError as e:  # one process
        code, who = shell_code(e.returncode), "the training process"
    except ChildFailedError as e:  # several: the first that failed; the others were stopped after it
        rank, failure = e.get_first_failure()
        code, who = shell_code(failure.exitcode), f"process {rank} (pid {failure.pid})"
    except SignalException as e:  # this launcher got SIGTERM: it passed it on, then waited for the workers
        code = 128 + e.sigval
        timeout = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
        print(
            f"launcher: {signal.Signals(e.sigval).name} passed on to the training processes (they had "
            f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={timeout} s to save and exit)",
            file=sys.stderr,
        )
        return code
    if code not in EXPLAINED:
        reason = f" ({signal.Signals(code - 128).name})" if 128 < code < 128 + signal.NSIG else ""
        print(f"launcher: {who} exited with code {code}{reason}; its output above says why", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
