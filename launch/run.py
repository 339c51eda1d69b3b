"""`accelerate launch` for schedulers: the training's own exit code, and no launcher traceback.

python launch/run.py [accelerate launch options] launch/train.py [key=value ...]

Takes exactly the options of `accelerate launch` (it runs Accelerate's own launcher). Where
`accelerate launch` exits 1 with a traceback after any failure (CalledProcessError for one process,
torch's ChildFailedError or SignalException for several), this exits with the code the training
chose, after the training's one message:
  0 finished | 2 config or data error | 3 loss became NaN/inf | 143 stopped on SIGTERM (checkpoint
  saved: the same command resumes; requeue it) | 1 anything else (the process's traceback above).
A process killed by signal N counts as 128+N, as in a shell. Without --config_file (and without an
`accelerate config` file) it passes launch/accelerate/default.yaml: one process unless the options say more,
and none of Accelerate's warnings about values it guessed.
"""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "accelerate" / "default.yaml"
# Codes whose message the training process already printed: the launcher adds nothing.
EXPLAINED = {0, 2, 3, 128 + signal.SIGINT, 128 + signal.SIGTERM}


def shell_code(returncode: int) -> int:
    """A child's return code as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def children() -> list[int]:
    """This process's children (Linux), for forwarding SIGTERM to the one-process launcher's child."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def forward_sigterm(signum, frame) -> None:
    # Accelerate's one-process launcher would die on SIGTERM and leave the training running
    # unwarned; the training saves and exits 143, which the launcher then reports.
    for pid in children():
        os.kill(pid, signum)


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
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    if args.config_file is None and not os.path.isfile(default_config_file):
        # Without a config Accelerate warns that it guessed each value (`--num_processes` ... `0`): say them.
        args.config_file = str(DEFAULT_CONFIG)
    args.quiet = False  # with -q the one-process launcher turns every exit code into 1
    quiet_torch_elastic()
    signal.signal(signal.SIGTERM, forward_sigterm)  # torch's launcher installs its own for several processes
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
        print(f"launcher: {signal.Signals(e.sigval).name} passed on to the training processes (they had "
              f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={timeout} s to save and exit)", file=sys.stderr)
        return code
    if code not in EXPLAINED:
        reason = f" ({signal.Signals(code - 128).name})" if 128 < code < 128 + signal.NSIG else ""
        print(f"launcher: {who} exited with code {code}{reason}; its output above says why", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
