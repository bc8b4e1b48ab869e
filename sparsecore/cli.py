"""The ``sparsecore`` command: ``demo``, ``show MASK_FILE``, ``check --device D``.

Every user error (an unknown or absent device, a backend or dtype it cannot run, a bad
number, a missing or malformed file, an unwritable output) prints one line on stderr,
``sparsecore <command>: error: ...``, and exits 2; no traceback. ``check`` exits 1 on a
mismatch or a kernel that raises on a case it takes (a FAIL line names the error), and never
reports a check it did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn

import numpy as np

from sparsecore.ir import BlockMask
from sparsecore.ir.validation import thawed_meta

DTYPES = ("float32", "float64", "float16", "bfloat16")
USER_ERRORS = (ValueError, TypeError, OSError)   # raised by the library on bad input; UnsupportedError included


class UserError(Exception):
    """A one-line complaint about the command line (printed, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 case, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..2**63-1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsecore", description="Compile block-sparse attention masks for any device.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="build masks for a small video input, compile, run, check and time them")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for mask PNGs and demo.json")
    demo.add_argument("--device", default=None, help="cpu, cuda, npu (default: the best one present)")

    show = sub.add_parser("show", help="print a saved mask's statistics and write its picture")
    show.add_argument("mask_file", type=Path)
    show.add_argument("--png", type=Path, default=None, help="where to write the picture (default: next to the file)")

    check = sub.add_parser("check", help="compare a backend with dense attention on random masks")
    check.add_argument("--device", required=True, help="reference, cpu, cuda, npu")
    check.add_argument("--backend", default=None, help="a registered backend (default: the device's preferred one)")
    check.add_argument("--cases", type=_count, default=25, help="random cases to run (at least 1)")
    check.add_argument("--seed", type=_seed, default=0)
    check.add_argument("--dtype", default=None, choices=DTYPES, help="float32 (default; float64 on reference)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):          # a path that is not UTF-8 is printed escaped, not an error
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return {"demo": _demo, "show": _show, "check": _check}[args.command](args)
    except BrokenPipeError:                          # `sparsecore show m | head`: the reader has what it wanted
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds no pipe
        except (OSError, ValueError):                # no file descriptor behind stdout (a captured stream)
            pass
        return 0
    except OSError as err:                           # a file or folder the command reads or writes
        where = f" {err.filename}" if err.filename else ""
        paths = {"show": "a mask file that exists, and a --png in a writable folder", "demo": "--out in a writable "
                 "folder"}.get(args.command, "paths that exist")
        print(f"sparsecore {args.command}: error: cannot use{where}: {err.strerror or _one_line(err)}; pass {paths}",
              file=sys.stderr)
        return 2
    except (UserError, *USER_ERRORS) as err:
        print(f"sparsecore {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsecore {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 1200 else text[:1197] + "..."


def _demo(args: argparse.Namespace) -> int:
    from .check import tensor_device_problem
    from .demo import format_table, run_demo
    if args.device is not None:
        problem = tensor_device_problem(args.device)
        if problem:
            raise UserError(f"{problem}; leave out --device to use the best device present")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a folder; pass a folder for the pictures and demo.json")
    rows = run_demo(args.out, device=args.device)
    print(format_table(rows))
    print(f"demo.json{'' if all(r['png'] is None for r in rows) else ' and mask pictures'} written to {args.out}/")
    return 0


def _show(args: argparse.Namespace) -> int:
    from sparsecore.ir.draw import MatplotlibMissing, png_path
    mask = BlockMask.load(args.mask_file)
    picture = args.png or args.mask_file.with_suffix(".png")     # its name checked before anything is printed
    if picture.resolve() == args.mask_file.resolve() or (picture.exists() and picture.samefile(args.mask_file)):
        raise UserError(f"the picture would overwrite the mask file {args.mask_file}; pass --png with "
                        "another path")
    try:
        png_path(picture)
    except ValueError as err:
        raise UserError(f"--png {err}") from None
    print(repr(mask))
    print(f"blocks: q {_block_summary(mask.q_block_sizes)}, kv {_block_summary(mask.kv_block_sizes)}")
    print(f"density per head: {_first(f'{d:.3f}' for d in mask.density(per_head=True))}")
    print(f"budgets per head: {_first(f'{b:.3f}' for b in mask.budgets)}")
    print("\n".join(_meta_lines(mask.meta)))
    print(f"fingerprint: {mask.fingerprint()}")
    if max(mask.num_q_blocks, mask.num_kv_blocks) <= 48 and mask.num_heads <= 16:
        print(mask.to_string())
    try:
        png = mask.render(picture)
    except MatplotlibMissing as err:
        print(f"picture skipped: {err}")
        return 0
    print(f"picture: {png}")
    return 0


def _meta_lines(meta: Mapping[str, Any], keys: int = 24, width: int = 160) -> list[str]:
    """``meta`` as ``key: value`` lines, each value as the JSON the file holds (not Python's reprs of the read-only
    copy a mask keeps: ``mappingproxy``, tuples, ``None``); at most ``keys`` lines of ``width`` characters."""
    if not meta:
        return ["meta: {}"]
    lines = ["meta:"]
    for key, value in list(thawed_meta(meta).items())[:keys]:
        name = key if key.isprintable() and key else json.dumps(key, ensure_ascii=False)   # "\n" stays escaped
        line = f"  {name}: {json.dumps(value, ensure_ascii=False)}"
        lines.append(line if len(line) <= width else line[:width - 3] + "...")
    if len(meta) > keys:
        lines.append(f"  ... ({len(meta) - keys} more keys)")
    return lines


def _first(items, count: int = 16) -> str:
    items = list(items)
    return " ".join(items[:count]) + (f" ... ({len(items)} heads)" if len(items) > count else "")


def _block_summary(sizes) -> str:
    distinct = [int(s) for s in np.unique(sizes)]
    return f"{len(sizes)} blocks of sizes {distinct[:6]}{' ...' if len(distinct) > 6 else ''}"


def _check(args: argparse.Namespace) -> int:
    from .check import device_problem, run_check
    dtype = args.dtype or ("float64" if args.device.split(":")[0] == "reference" else "float32")   # "reference:0"
    problem = device_problem(args.device, args.backend, dtype)
    if problem:
        raise UserError(problem)

    def report(result) -> None:
        if result.skipped:
            print(f"skip case {result.case:3d}: {result.skipped}")
            return
        if result.raised:
            print(f"FAIL case {result.case:3d} [{result.backend}] {result.raised}  {result.description}")
            return
        status = "ok  " if result.passed else "FAIL"
        print(f"{status} case {result.case:3d} [{result.backend}] rel err {result.rel_err:.2e}  lse err "
              f"{result.lse_err:.1e}  {result.description}" + (f"  ({result.broken})" if result.broken else ""))

    summary = run_check(args.device, args.backend, args.cases, args.seed, dtype, report)
    skipped = f" ({summary.skipped} more skipped: the backend cannot take them)" if summary.skipped else ""
    if summary.ran == 0:
        print(f"NOTHING CHECKED: the backend could take none of the {args.cases} cases")
        return 1
    if summary.ok:
        print(f"all {summary.ran} cases match dense attention{skipped}")
        return 0
    if summary.raised:
        print("KERNEL ERROR: the kernel raised on a case it takes (a bug of the kernel, not of this command line)")
        return 1
    print("MISMATCH: the kernel differs from dense attention")
    return 1


if __name__ == "__main__":
    sys.exit(main())
