"""Argument checks shared by epa_ext's public functions.

One convention everywhere (Python wrappers, fake kernels, C++ checks): a value of the wrong type
raises TypeError, a value of the right type that is not allowed raises ValueError, and the
message names the argument, what it must be, what it got and, where there is one, how to go on.
Each helper returns the checked value converted to its canonical Python type (``float``,
``int``, ``bool``), so a caller never passes on a value it did not check.

The checks run before any tensor is touched, so a bad option fails in the same way on every
device and under torch.compile (where dynamo evaluates them on constants at trace time).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor


def _type_name(value: object) -> str:
    return type(value).__name__


def check_tensor(name: str, value: object) -> Tensor:
    """``value`` itself if it is a torch.Tensor; TypeError naming ``name`` otherwise (a Python
    list where a tensor is expected included)."""
    if not isinstance(value, Tensor):
        hint = f"; convert it with torch.tensor({name})" if isinstance(value, (list, tuple)) else ""
        raise TypeError(f"{name} must be a torch.Tensor; got {_type_name(value)}{hint}")
    return value


def check_optional_tensor(name: str, value: object) -> Tensor | None:
    """None, or ``check_tensor(name, value)``."""
    return None if value is None else check_tensor(name, value)


def check_float(name: str, value: object, *, above: float | None = None, at_least: float | None = None,
                below: float | None = None) -> float:
    """A finite real number as ``float``, optionally bounded: ``value > above``,
    ``value >= at_least``, ``value < below``.

    TypeError for anything that is not a real number (a string such as ``"0.1"``, a bool, a
    tensor); ValueError for inf, NaN or a value outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (float or int); got {_type_name(value)} {value!r}")
    if torch.compiler.is_compiling():
        # torch.compile traces a float that changed between calls as a symbol, whose value is known
        # only when the compiled code runs; there the op's own C++ check refuses a bad value.
        return value
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {number}")
    if above is not None and not number > above:
        raise ValueError(f"{name} must be > {above}; got {number}")
    if at_least is not None and not number >= at_least:
        raise ValueError(f"{name} must be >= {at_least}; got {number}")
    if below is not None and not number < below:
        raise ValueError(f"{name} must be < {below}; got {number}")
    return number


def check_positive_float(name: str, value: object) -> float:
    """A finite number > 0 (``beta``, temperatures, scales)."""
    return check_float(name, value, above=0.0)


SMALLEST_NORMAL_FLOAT32 = float(torch.finfo(torch.float32).tiny)
LARGEST_FLOAT32 = float(torch.finfo(torch.float32).max)


def check_softcap(value: object) -> float | None:
    """None (no softcapping), or the cap c of ``logits -> c * tanh(logits / c)`` as a float: a
    number in float32's normal range [SMALLEST_NORMAL_FLOAT32, LARGEST_FLOAT32], since the kernels
    cap in float32, where a smaller cap rounds to 0 and a larger one to inf (TypeError for a tensor,
    a string or a bool; ValueError for 0, negative, inf, NaN or out of that range)."""
    if value is None:
        return None
    number = check_float("softcap", value, above=0.0)
    if not torch.compiler.is_compiling() and not SMALLEST_NORMAL_FLOAT32 <= number <= LARGEST_FLOAT32:
        raise ValueError(f"softcap must be in [{SMALLEST_NORMAL_FLOAT32}, {LARGEST_FLOAT32}] (float32's normal range, "
                         f"in which the kernels cap); got {number}")
    return number


def beta_in_range(op: str, beta: float, dtype: torch.dtype) -> None:
    """csrc/losses_checks.h's check_beta for the fake kernels: beta must be a normal number of the
    dtype the loss is computed in (float64 for float64 inputs, float32 for the others), since one
    that rounds to 0 or inf there gives NaN gradients or losses."""
    computed_in = torch.float64 if dtype == torch.float64 else torch.float32
    least, most = float(torch.finfo(computed_in).tiny), float(torch.finfo(computed_in).max)
    torch._check_value(least <= beta <= most, lambda: f"{op}: beta must be a number in [{least}, {most}] "
                       f"({str(computed_in).removeprefix('torch.')}'s normal range, in which the loss is computed); "
                       f"got {beta}")


def check_int(name: str, value: object, *, at_least: int | None = None, at_most: int | None = None) -> int:
    """An integer as ``int`` (Python, NumPy and torch.SymInt integers accepted), optionally in
    ``[at_least, at_most]``.

    TypeError for bools and for non-integers, 1.5 and 2.0 included: a count is never rounded or
    truncated silently. ValueError outside the bounds.
    """
    if isinstance(value, torch.SymInt):
        number = value
    elif isinstance(value, bool) or isinstance(value, Tensor):
        raise TypeError(f"{name} must be an int; got {_type_name(value)} {value!r}")
    else:
        try:
            number = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int; got {_type_name(value)} {value!r}") from None
    if at_least is not None and not number >= at_least:
        raise ValueError(f"{name} must be >= {at_least}; got {number}")
    if at_most is not None and not number <= at_most:
        raise ValueError(f"{name} must be <= {at_most}; got {number}")
    return number


def check_bool(name: str, value: object) -> bool:
    """``True`` or ``False`` only (no truthiness of strings or tensors)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {_type_name(value)} {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """One of the strings ``choices``: TypeError for a non-string, ValueError for another string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {tuple(choices)}; got {_type_name(value)} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value


def check_same_device(name: str, tensor: Tensor, like_name: str, like: Tensor) -> None:
    """ValueError naming both devices unless ``tensor`` is on ``like``'s device (a meta tensor
    mixed with real ones included: it has no data to compute with)."""
    if tensor.device != like.device:
        hint = (" (a meta tensor has no data: move both to one real device, or all to meta for shape checks)"
                if "meta" in (tensor.device.type, like.device.type) else "")
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}); got {tensor.device}{hint}")


# Keyword arguments of the public functions renamed before 1.0 (one name per concept), with their
# new names: length averaging is ``average``, the chunk budget ``max_chunk_tokens``.
RENAMED = {"averaged": "average", "chunk_size": "max_chunk_tokens"}


def refuse_renamed(function: str, given: dict, renames: dict[str, str]) -> None:
    """Raises TypeError for keyword arguments a public function does not take (given: its
    ``**renamed``), naming the new name of one that was renamed (one name per concept, before 1.0)."""
    for name in given:
        new = renames.get(name)
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}"
                        + (f": it is called {new!r} now" if new else ""))
