"""Bounds and assertions shared by the hostile-input tests (``test_hostile_*.py``, ``test_fuzz_mask_files.py``).

Memory is bounded with the address-space limit (``RLIMIT_AS``), which makes an allocation
beyond it fail at once (``MemoryError`` from Python and NumPy, ``RuntimeError`` from torch)
instead of swapping: either is a test failure, since hostile input must be refused before
work in proportion to what it claims. :func:`bounded` lowers the *soft* limit of this
process to its current address space plus a headroom for the duration of a block and
restores it after (an unprivileged process may raise its soft limit back up to the hard
one); :func:`run_bounded` runs code in a fresh interpreter under a hard limit, for what
could crash or hang a process. Time is bounded by measuring each block (and by a timeout
for subprocesses). Linux only (``/proc/self/status``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

HEADROOM = 1 << 30         # bytes of address space one hostile call may add (the claimed sizes are far larger)
SECONDS = 20.0             # wall time one hostile call may take (generous: CI machines are shared)
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

if not Path("/proc/self/status").exists():      # pragma: no cover
    pytest.skip("hostile-input bounds read /proc/self/status (Linux)", allow_module_level=True)


def address_space() -> int:
    """Bytes of virtual address space this process holds now (``VmSize``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def bounded(headroom: int = HEADROOM, seconds: float = SECONDS) -> Iterator[None]:
    """Run the block with at most ``headroom`` more bytes of address space, and in at most ``seconds``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    began = time.monotonic()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    elapsed = time.monotonic() - began
    assert elapsed < seconds, f"took {elapsed:.1f} s (limit {seconds} s): work before validation?"


def refused(call: Callable[[], Any], fields: tuple[str, ...] | str, types: tuple[type, ...] = (ValueError, TypeError),
            headroom: int = HEADROOM) -> BaseException:
    """``call()`` must raise one of ``types`` within the bounds, with a message naming one of ``fields``. What a call
    wrongly accepted is undone (:func:`undo`), so that the next calls of a module fail for their own reasons."""
    fields = (fields,) if isinstance(fields, str) else fields
    with bounded(headroom):
        try:
            result = call()
        except types as err:
            message = str(err)
            error = err
        else:
            message = None
    if message is None:
        try:
            raise AssertionError(f"accepted {described(call)}, returned {str(result)[:200]}; expected {types} naming "
                                 f"{fields}")
        finally:
            undo(result)
    assert any(field in message for field in fields), f"{type(error).__name__}: {message!r} names none of {fields}"
    assert "\n" not in message.strip(), f"a multi-line message: {message!r}"
    return error


def undo(result: Any) -> None:
    """``result.remove()`` where it takes no arguments (an ``apply()``'s handle): a model left patched would make every
    later ``apply()`` of the module fail as 'already applied'. Anything else (a list's ``remove(x)``) is left as is."""
    remove = getattr(result, "remove", None)
    if not callable(remove):
        return
    try:
        parameters = inspect.signature(remove).parameters.values()
    except (TypeError, ValueError):                   # a callable without a signature: not a handle's method
        return
    if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        remove()


def described(call: Callable[[], Any]) -> str:
    """``call`` for a message: its source line, place and free variables (``**arguments``' values)."""
    code = getattr(call, "__code__", None)
    if code is None:
        return repr(call)[:200]
    try:
        source = f"`{inspect.getsource(call).strip().splitlines()[0][:200]}`"
    except OSError:                                   # no source at hand
        source = call.__qualname__
    values = "".join(f"; {name}={str(cell.cell_contents)[:200]}" for name, cell in
                     zip(code.co_freevars, call.__closure__ or ()) if cell_set(cell))
    return f"{source} ({Path(code.co_filename).name}:{code.co_firstlineno}{values})"


def cell_set(cell: Any) -> bool:
    """Whether a closure's variable has a value yet."""
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def run_bounded(code: str, memory: int = HEADROOM, seconds: float = 120.0,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (cwd: the repository root) after ``import numpy, torch, sparsecore``,
    with the hard address-space limit set to what that process holds then plus ``memory``."""
    prelude = textwrap.dedent(f"""\
        import resource, sys
        sys.path.insert(0, {str(TESTS)!r})
        import numpy, torch, sparsecore
        from hostile import address_space
        _limit = address_space() + {int(memory)}
        resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))
        """)
    full_env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=seconds, env=full_env)
