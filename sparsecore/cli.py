"""The ``sparsecore`` command: ``demo``, ``show MASK_FILE``, ``check --device D``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsecore.ir import BlockMask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsecore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build masks for a small video input, compile, run, check and time them")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for mask PNGs and demo.json")
    demo.add_argument("--device", default=None, help="cpu, cuda, npu (default: the best one present)")

    show = sub.add_parser("show", help="print a saved mask's statistics and write its picture")
    show.add_argument("mask_file", type=Path)
    show.add_argument("--png", type=Path, default=None, help="where to write the picture (default: next to the file)")

    check = sub.add_parser("check", help="compare a backend with dense attention on random masks")
    check.add_argument("--device", required=True, help="reference, cpu, cuda, npu")
    check.add_argument("--backend", default=None, help="a registered backend (default: the device's preferred one)")
    check.add_argument("--cases", type=int, default=25)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--dtype", default=None, help="float32 (default), float64, float16, bfloat16")

    args = parser.parse_args(argv)
    return {"demo": _demo, "show": _show, "check": _check}[args.command](args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo
    rows = run_demo(args.out, device=args.device)
    print(format_table(rows))
    print(f"mask pictures and demo.json written to {args.out}/")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        mask = BlockMask.load(args.mask_file)
    except (OSError, ValueError) as err:
        print(f"sparsecore show: {err}", file=sys.stderr)
        return 2
    print(repr(mask))
    print(f"blocks: q {_block_summary(mask.q_block_sizes)}, kv {_block_summary(mask.kv_block_sizes)}")
    print(f"density per head: {' '.join(f'{d:.3f}' for d in mask.density(per_head=True))}")
    print(f"budgets per head: {' '.join(f'{b:.3f}' for b in mask.budgets)}")
    print(f"meta: {dict(mask.meta)}")
    print(f"fingerprint: {mask.fingerprint()}")
    if max(mask.num_q_blocks, mask.num_kv_blocks) <= 48:
        print(mask.to_string())
    png = mask.render(args.png or args.mask_file.with_suffix(".png"))
    print(f"picture: {png}")
    return 0


def _block_summary(sizes) -> str:
    distinct = sorted(set(int(s) for s in sizes))
    return f"{len(sizes)} blocks of sizes {distinct[:6]}{' ...' if len(distinct) > 6 else ''}"


def _check(args: argparse.Namespace) -> int:
    from .check import run_check
    dtype = args.dtype or ("float64" if args.device == "reference" else "float32")

    def report(result) -> None:
        status = "ok  " if result.passed else "FAIL"
        print(f"{status} case {result.case:3d} [{result.backend}] rel err {result.rel_err:.2e}  {result.description}")

    passed = run_check(args.device, args.backend, args.cases, args.seed, dtype, report)
    print("all cases match dense attention" if passed else "MISMATCH: the kernel differs from dense attention")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
