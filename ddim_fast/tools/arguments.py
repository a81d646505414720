"""Argument checks shared by the tools: argparse ``type=`` functions, so that a bad value is refused by
argparse itself, before any work or output, with its standard message naming what the user typed
(``argument --steps: must be >= 1, got 0``), and the same checks for the tools' Python functions
(:func:`require`: ``run_demo: steps must be >= 1, got 0``).

A value the user gave is never replaced by a default: 0 steps is an error, not "the default number".
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Iterable

# Every noise schedule the tools run (SD's, the embedded model's) has 1000 training timesteps: more DDIM
# steps than that do not exist.
MAX_STEPS = 1000


# --------------------------------------------------------------------------------------------------
# The checks: each returns what is wrong with a value ("must be >= 1, got 0"), or None
# --------------------------------------------------------------------------------------------------


def int_problem(value: int, minimum: int | None = None, maximum: int | None = None,
                multiple_of: int | None = None, why: str = "", why_minimum: bool = True) -> str | None:
    """What is wrong with an int: out of [minimum, maximum] or not a multiple of ``multiple_of``; ``why``
    explains the bounds (the minimum too unless ``why_minimum`` is False)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    reason = f" ({why})" if why else ""
    if minimum is not None and value < minimum:
        return f"must be >= {minimum}{reason if why_minimum else ''}, got {value}"
    if maximum is not None and value > maximum:
        return f"must be <= {maximum}{reason}, got {value}"
    if multiple_of is not None and value % multiple_of:
        return f"must be a multiple of {multiple_of}{reason}, got {value}"
    return None


def float_problem(value: float, minimum: float | None = None) -> str | None:
    """What is wrong with a float: not finite, or below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if minimum is not None and value < minimum:
        return f"must be >= {minimum:g}, got {value:g}"
    return None


def require(where: str, name: str, problem: str | None) -> None:
    """Raise ValueError('<where>: <name> <problem>') when there is a problem (the tools' Python functions)."""
    if problem:
        raise ValueError(f"{where}: {name} {problem}")


# --------------------------------------------------------------------------------------------------
# argparse types
# --------------------------------------------------------------------------------------------------


def _parse_int(text: str) -> int:
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def integer(minimum: int | None = None, maximum: int | None = None, multiple_of: int | None = None,
            why: str = "", why_minimum: bool = True) -> Callable[[str], int]:
    """An argparse type: an int in [minimum, maximum], a multiple of ``multiple_of`` when given."""
    def convert(text: str) -> int:
        value = _parse_int(text)
        problem = int_problem(value, minimum, maximum, multiple_of, why, why_minimum)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return convert


def number(minimum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite float (>= ``minimum`` when given); 'nan' and 'inf' are refused."""
    def convert(text: str) -> float:
        value = _parse_float(text)
        problem = float_problem(value, minimum)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return convert


positive_int = integer(1)
non_negative_int = integer(0)
steps = integer(1, MAX_STEPS, why="the noise schedule has 1000 training timesteps", why_minimum=False)
finite_float = number()
non_negative_float = number(0.0)
# A UNet's latent is resolution / 8: any other resolution would be silently rounded down.
resolution = integer(8, multiple_of=8, why="the latent is resolution / 8")


def device(text: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N', refused when no such device is visible (the string is returned:
    the tools resolve 'auto' themselves)."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"no CUDA device is visible here, got {text!r} (use cpu or auto)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{torch.cuda.device_count()} CUDA device(s) visible, got {text!r}")
    return text


def output_file(text: str) -> str:
    """A file the tool will write at the end: its folder must exist and be writable now, so that a long run
    is not lost to a typo in the path."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file path")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist (for {text})")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {folder} is not writable (for {text})")
    return text


def output_dir(text: str) -> str:
    """A directory the tool creates (with its parents) or fills: it must not be an existing file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return text


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}" if not os.path.exists(text)
                                         else f"{text} is not a file")
    return text


def names(choices: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of distinct names out of ``choices`` ('auto,reference')."""
    allowed = tuple(choices)

    def convert(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(","))
        if not items or any(not item for item in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}, got "
                                             f"{text!r}")
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; expected a comma-separated "
                                             f"list of {', '.join(allowed)}")
        repeated = sorted({item for item in items if items.count(item) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, repeated))} given twice in {text!r}")
        return items
    return convert
