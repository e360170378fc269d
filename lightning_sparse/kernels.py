"""Fused CPU loops for the passes sparse training adds to every step: one pass over memory where eager PyTorch
makes several.

Each elementwise op in eager PyTorch is a pass over the weight, and on a CPU the passes a sparse method adds to a
step cost more than its convolutions notice: STR's backward (kept gradient, sign, dot product), ST-3's selection
(two comparisons, a count, a boolean index) and its mask, rescale and effective weight. The loops here do each in
one pass. They are a small C source, compiled once per machine with the system's C compiler (`CC`, else `cc`) into
the user's cache directory and loaded with `ctypes`: no torch headers and no compiler runtime in the process, so the
first use costs well under a second and the process no memory.

Each function serves contiguous float32 CPU tensors of at least `MIN_ELEMENTS` entries that autograd does not
track, outside `torch.compile`, and returns None (or False) anywhere else: the caller then runs its eager form,
which computes the same values. A fused sum may round differently (its order of summation); an elementwise result
never does. If no compiler works, one warning says so and the eager forms run from then on.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MIN_ELEMENTS", "count_below_and_select", "soft_threshold_backward", "st3_apply"]

MIN_ELEMENTS = 1 << 12
"""Below this many entries the eager forms are as fast: a call here costs a few microseconds."""

# Lanes of 16 independent sums and counts: the compiler vectorises them without reassociating a float sum.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>

double soft_threshold_backward(const float *restrict grad, const float *restrict weight, float g,
                               float *restrict kept, int64_t n) {
    float lanes[16] = {0};
    double total = 0.0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) {
            float w = weight[i + j], k = fabsf(w) > g ? grad[i + j] : 0.0f;
            kept[i + j] = k;
            lanes[j] += w > 0.0f ? k : -k;
        }
    for (; i < n; i++) {
        float w = weight[i], k = fabsf(w) > g ? grad[i] : 0.0f;
        kept[i] = k;
        total += w > 0.0f ? k : -k;
    }
    for (int j = 0; j < 16; j++) total += lanes[j];
    return total;
}

/* Counts below `lo` and copies out those in [lo, hi]: a vector pass counts both per block of 16, and only the
   blocks holding one are copied, without branches (each entry stored, the end advanced by whether it is inside).
   Stores stop 16 short of `capacity`; the count does not: all were stored iff the count + 16 <= capacity. */
int64_t count_below_and_select(const float *restrict v, int64_t n, float lo, float hi, float *restrict inside,
                               int64_t capacity, int64_t *n_inside) {
    int64_t below = 0, m = 0, i = 0;
    for (; i + 256 <= n; i += 256) {
        int b = 0, in[16] = {0};
        for (int k = 0; k < 16; k++)
            for (int j = 0; j < 16; j++) {
                float x = v[i + 16 * k + j];
                b += x < lo;
                in[k] += (x >= lo) & (x <= hi);
            }
        below += b;
        for (int k = 0; k < 16; k++) {
            if (!in[k]) continue;
            if (m + 16 > capacity) {
                m += in[k];
                continue;
            }
            for (int j = 0; j < 16; j++) {
                float x = v[i + 16 * k + j];
                inside[m] = x;
                m += (x >= lo) & (x <= hi);
            }
        }
    }
    for (; i < n; i++) {
        float x = v[i];
        below += x < lo;
        if (x >= lo && x <= hi) {
            if (m + 16 <= capacity) inside[m] = x;
            m++;
        }
    }
    *n_inside = m;
    return below;
}

void st3_apply(const float *restrict weight, float *restrict effective, uint8_t *restrict mask,
               float *restrict scale, const float *restrict total, int64_t rows, int64_t cols, float threshold,
               float width, float shrink, float epsilon, int rescale) {
    for (int64_t r = 0; r < rows; r++) {
        const float *w = weight + r * cols;
        float s = 1.0f;
        if (rescale) {
            float lanes[16] = {0};
            double kept = 0.0;
            int64_t c = 0;
            for (; c + 16 <= cols; c += 16)
                for (int j = 0; j < 16; j++) {
                    float a = fabsf(w[c + j]);
                    lanes[j] += a * width > threshold ? a : 0.0f;
                }
            for (; c < cols; c++) {
                float a = fabsf(w[c]);
                kept += a * width > threshold ? a : 0.0f;
            }
            for (int j = 0; j < 16; j++) kept += lanes[j];
            float fraction = ((float)kept + epsilon) / (total[r] + epsilon);
            s = 1.01f / (fraction + 0.01f);
            scale[r] = s;
        }
        for (int64_t c = 0; c < cols; c++) {
            float x = w[c];
            mask[r * cols + c] = fabsf(x) * width > threshold;
            effective[r * cols + c] = (x > shrink ? x - shrink : (x < -shrink ? x + shrink : 0.0f)) * s;
        }
    }
}
"""

_POINTER, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "soft_threshold_backward": (ctypes.c_double, [_POINTER, _POINTER, ctypes.c_float, _POINTER, _I64]),
    "count_below_and_select": (
        _I64,
        [_POINTER, _I64, ctypes.c_float, ctypes.c_float, _POINTER, _I64, ctypes.POINTER(_I64)],
    ),
    "st3_apply": (
        None,
        [_POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _I64, _I64] + [ctypes.c_float] * 4 + [ctypes.c_int],
    ),
}
# The loaded library, or None once building it failed (then the eager forms run): see `_library`.
_loaded: dict[str, ctypes.CDLL | None] = {}


def _library() -> ctypes.CDLL | None:
    """The loops, built on the first call; None, with one warning, if they cannot be."""
    if "library" not in _loaded:
        try:
            _loaded["library"] = _build()
        except (OSError, subprocess.SubprocessError) as error:
            _loaded["library"] = None
            warnings.warn(
                f"lightning-sparse: could not build its fused CPU loops ({error}); training goes on with eager "
                "PyTorch, which computes the same values in several passes per step instead of one. They need a C "
                "compiler: `cc` on the PATH, or one named by `CC`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded["library"]


def _build() -> ctypes.CDLL:
    """Compile `_SOURCE` for this machine's CPU (once per CPU, compiler and source) into the cache directory, and
    load it."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler `{compiler}`")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning-sparse"
    cache.mkdir(parents=True, exist_ok=True)
    # `-march=native` for the vector width and byte stores; keyed by the CPU, as a home directory can be shared by
    # machines with different CPUs. Without it (a compiler that refuses it) the loops are correct, only slower.
    errors = []
    for flags in (["-O3", "-march=native"], ["-O3"]):
        key = hashlib.sha256("\n".join([_SOURCE, compiler, *flags, _cpu()]).encode()).hexdigest()[:16]
        library = cache / f"kernels-{key}.so"
        if not library.exists():
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                source, built = Path(scratch) / "kernels.c", Path(scratch) / "kernels.so"
                source.write_text(_SOURCE)
                command = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(built), "-lm"]
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode:
                    errors.append(next(iter(run.stderr.strip().splitlines()), f"exit status {run.returncode}"))
                    continue
                # Atomic: processes building at once (DDP ranks) each install a whole library.
                os.replace(built, library)
        loaded = ctypes.CDLL(str(library))
        for name, (result, arguments) in _SIGNATURES.items():
            function = getattr(loaded, name)
            function.restype, function.argtypes = result, arguments
        return loaded
    raise OSError(f"`{compiler}` failed to compile them: {errors[-1]}")


def _cpu() -> str:
    """What identifies this machine's CPU for `-march=native`: its model and feature flags where Linux lists them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    found = [line for line in lines if line.startswith(("model name", "flags", "Features"))][:2]
    return "\n".join([platform.machine(), platform.processor(), sys.platform, *found])


def _servable(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, if every tensor is contiguous float32 on CPU, the first large, and neither autograd would track
    the result (it would not be differentiable) nor `torch.compile` is tracing (it cannot trace a foreign call)."""
    if tensors[0].numel() < MIN_ELEMENTS or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return _library()


def soft_threshold_backward(grad: Tensor, weight: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor] | None:
    """STR's two gradients in one pass: `grad` where `|weight| > threshold` (else 0), and the threshold's,
    `-sum(kept * sign(weight))`. None where the fused loop does not serve.

    Example:
        >>> w = torch.linspace(-1, 1, MIN_ELEMENTS)
        >>> kept, d_threshold = soft_threshold_backward(torch.ones_like(w), w, torch.tensor(0.5))
        >>> bool(torch.equal(kept, (w.abs() > 0.5).float())), round(d_threshold.item())
        (True, 0)
    """
    library = _servable(grad, weight, threshold)
    if library is None:
        return None
    kept = torch.empty_like(grad)
    total = library.soft_threshold_backward(
        grad.data_ptr(), weight.data_ptr(), threshold.item(), kept.data_ptr(), grad.numel()
    )
    return kept, torch.tensor(-total, dtype=torch.float32)


def count_below_and_select(values: Tensor, lo: float, hi: float, expected: int) -> tuple[int, Tensor] | None:
    """How many of the flat `values` are below `lo`, and those in `[lo, hi]` (in their order), in one pass; room is
    made for `expected` of them (one more pass if there are more). None where the fused loop does not serve.

    Example:
        >>> count_below_and_select(torch.arange(float(MIN_ELEMENTS)), 2.5, 4.0, expected=2)
        (3, tensor([3., 4.]))
    """
    library = _servable(values)
    if library is None:
        return None
    found = ctypes.c_int64()

    def select(inside: Tensor) -> int:
        return int(
            library.count_below_and_select(
                values.data_ptr(), values.numel(), lo, hi, inside.data_ptr(), inside.numel(), ctypes.byref(found)
            )
        )

    inside = torch.empty(expected + 16, dtype=torch.float32)
    below = select(inside)
    if found.value + 16 > inside.numel():  # more than expected: once more, with room for all
        inside = torch.empty(found.value + 16, dtype=torch.float32)
        below = select(inside)
    return below, inside[: found.value]


def st3_apply(
    weight: Tensor,
    effective: Tensor,
    mask: Tensor,
    scale: Tensor,
    total: Tensor | None,
    threshold: float,
    width: float,
    epsilon: float,
) -> bool:
    """ST-3's mask (`|w| * width > threshold`), the channel rescale from the kept L1 mass over `total` (if given), and
    the effective weight `softshrink(w, threshold / width) * scale` into `effective`, in one pass over each output
    channel (the rows of `weight`, channels first). False where the fused loop does not serve: nothing is written.
    """
    tensors = [weight, effective, scale] + ([total] if total is not None else [])
    library = _servable(*tensors)
    if library is None or mask.dtype != torch.bool or not mask.is_contiguous() or weight.dim() == 0:
        return False
    rows = weight.shape[0]
    library.st3_apply(
        weight.data_ptr(), effective.data_ptr(), mask.data_ptr(), scale.data_ptr(),
        total.data_ptr() if total is not None else None, rows, weight.numel() // rows,
        threshold, width, threshold / width, epsilon, total is not None,
    )  # fmt: skip
    return True
