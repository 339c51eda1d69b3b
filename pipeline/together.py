"""Steps that some processes do and others wait for end the same way on every process: an error on one
process is raised on all of them, within seconds, instead of leaving the others waiting in the next
collective until its timeout and exiting with an abort code in place of the error's.
"""

from __future__ import annotations

from contextlib import contextmanager

from accelerate.utils import gather_object

from pipeline.errors import CompareError, ConfigError, DataError, DiskFull

# Errors meant for people keep their class, and so their exit code, on every process (see pipeline/cli.py).
PEOPLES_ERRORS = {e.__name__: e for e in (ConfigError, DataError, DiskFull, CompareError)}


def verdict(error: BaseException | None) -> tuple | None:
    """What the other processes need to raise the same error: its class name, message and errno."""
    return None if error is None else (type(error).__name__, str(error), getattr(error, "errno", None))


def raised(answer: tuple) -> Exception:
    """The error another process's `verdict` describes, as this process raises it."""
    kind, message, errno = answer
    if kind in PEOPLES_ERRORS:
        return PEOPLES_ERRORS[kind](message)
    if errno is not None:  # e.g. a full disk: the same errno, so that this process reads it the same way
        return OSError(errno, f"another process stopped: {message}")
    return RuntimeError(f"another process stopped: {kind}: {message}")


@contextmanager
def all_or_none(state):
    """The block runs on every process of `state` (an Accelerator or PartialState) and ends with them all
    together, in place of a `wait_for_everyone()` after it: where it raised on any process, it raises on
    every one (its own error where it raised, the first other process's elsewhere)."""
    error = None
    try:
        yield
    except Exception as e:
        error = e
    if state.num_processes > 1:
        answers = gather_object([verdict(error)])
        if error is None and (first := next((a for a in answers if a), None)):
            raise raised(first)
    if error is not None:
        raise error


def shared_verdict(state, check, *args, everywhere: bool = False):
    """`check(*args)` on the main process (on every process with `everywhere`), its error raised on every
    process. Returns the main process's result, on every process."""
    result, error = None, None
    if everywhere or state.is_main_process:
        try:
            result = check(*args)
        except Exception as e:
            error = e
    if state.num_processes == 1:
        if error is not None:
            raise error
        return result
    answers = gather_object([(result if state.is_main_process else None, verdict(error))])
    if error is not None:
        raise error
    if first := next((reason for _, reason in answers if reason), None):
        raise raised(first)
    return answers[0][0]
