"""Accuracy every backend must reach against the float64 oracle, per input dtype.

``OUT_REL``: relative L2 error of the output, ||out - ref|| / ||ref||. ``LSE_ABS``:
largest LSE error over rows that keep a key, relative to max(1, |lse|) since LSE is float32. Inputs are rounded to the
dtype before the oracle sees them, so these bound the kernel's own arithmetic:
float64 is the reference's exactness; float32 accumulates in float32; fp16 and
bf16 kernels round the probabilities and the output to the input type (about
2^-11 and 2^-8 relative), summed over a row.
"""

OUT_REL = {"float64": 1e-10, "float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}
# ``ROW_REL``: the same for each row (against the larger of its norm and the root-mean-square row norm): ten times
# OUT_REL, so a row the kernel got wrong fails even where the whole output's error stays within OUT_REL.
ROW_REL = {dtype: 10 * tolerance for dtype, tolerance in OUT_REL.items()}
LSE_ABS = {"float64": 1e-5, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-3}
# LSE is float32 by contract (so float64 inputs cannot do better than float32 rounding).
