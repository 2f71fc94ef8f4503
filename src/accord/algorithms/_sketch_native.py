"""A fused CPU kernel for :meth:`accord.algorithms._gram_sketch.GramSketch.fill_`.

Torch's path adds each row of the gradient into the sketch vector y with one kernel per
row and takes the norms in a second read. The kernel here reads the gradient once, in
order: a tile of y (64K numbers, 256 KB, with the table's window of the same size, held in
the second-level cache) takes every row's part in turn, and each row's squares are summed
in the same pass. Inside the training step (the 10M-parameter MLP, N = 2) the fill takes
4.6 ms with 64K-number tiles against 5.5 ms with 1K-number tiles held in the first-level
cache (the gradient is then read as 150 interleaved 4 KB streams) and about 9 ms on the
torch path (docs/results/acga-overhead.md). The sketch y is bit for bit the torch path's
(the signs are +-1, so every product is exact and each number sums the rows in the same
order); the squared norms are summed in another order, so they agree to rounding.

It is built with ``torch.utils.cpp_extension`` on first use (about 25 s, once per machine
and source) into ``$ACCORD_CACHE_DIR`` (default ``~/.cache/accord``), under a file lock that
the kernel's death releases; later processes load the built library without a lock.
``ACCORD_NATIVE`` chooses: ``auto`` (default) uses the kernel where it builds and the torch
path otherwise (saying why once), ``off`` never builds it, ``on`` fails when it cannot.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import sys
from types import ModuleType

import torch

from ..core import cache_dir

log = logging.getLogger(__name__)

#: the values ``ACCORD_NATIVE`` takes
CHOICES = ("auto", "off", "on")

#: numbers of y in one tile (256 KB of fp32; see the module docstring)
TILE = 65536

SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <vector>

// Piece p adds taus[p] * table[tabpos[p] + l] * g_p[l] into y[ypos[p] + l] (mode 1) or
// copies g_p[l] there (mode 0), for l < len(g_p), and writes sum_l g_p[l]^2 into
// squares[slots[p]]. Pieces that add into the same numbers of y do so in the order given.
void sketch_pieces(torch::Tensor y, std::vector<torch::Tensor> srcs, torch::Tensor ypos,
                   torch::Tensor tabpos, torch::Tensor taus, torch::Tensor modes,
                   torch::Tensor table, torch::Tensor squares, torch::Tensor slots,
                   int64_t tile) {
  const int64_t P = static_cast<int64_t>(srcs.size());
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == torch::kFloat && y.device().is_cpu(),
              "sketch_pieces: y must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(table.is_contiguous() && table.scalar_type() == torch::kFloat,
              "sketch_pieces: the table must be contiguous fp32");
  TORCH_CHECK(ypos.numel() == P && tabpos.numel() == P && taus.numel() == P &&
              modes.numel() == P && slots.numel() == P, "sketch_pieces: one entry per piece");
  float* yp = y.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  const int64_t* yo = ypos.data_ptr<int64_t>();
  const int64_t* to = tabpos.data_ptr<int64_t>();
  const float* ta = taus.data_ptr<float>();
  const int64_t* mo = modes.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  float* sq = squares.data_ptr<float>();
  const int64_t width = y.numel(), tabn = table.numel(), nsq = squares.numel();
  std::vector<const float*> gp(P);
  std::vector<int64_t> len(P);
  std::vector<double> acc(P, 0.0);
  int64_t lo_all = width, hi_all = 0;
  for (int64_t p = 0; p < P; ++p) {
    const torch::Tensor& s = srcs[p];
    TORCH_CHECK(s.is_contiguous() && s.scalar_type() == torch::kFloat && s.device().is_cpu(),
                "sketch_pieces: every piece must be a contiguous fp32 CPU tensor");
    gp[p] = s.data_ptr<float>();
    len[p] = s.numel();
    TORCH_CHECK(yo[p] >= 0 && yo[p] + len[p] <= width, "sketch_pieces: piece outside y");
    TORCH_CHECK(mo[p] == 0 || (to[p] >= 0 && to[p] + len[p] <= tabn),
                "sketch_pieces: piece outside the table");
    TORCH_CHECK(sl[p] >= 0 && sl[p] < nsq, "sketch_pieces: slot outside squares");
    lo_all = std::min(lo_all, yo[p]);
    hi_all = std::max(hi_all, yo[p] + len[p]);
  }
  for (int64_t a = lo_all; a < hi_all; a += tile) {
    const int64_t b = std::min(a + tile, hi_all);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lo = std::max(a, yo[p]), hi = std::min(b, yo[p] + len[p]);
      if (lo >= hi) continue;
      const float* __restrict__ g = gp[p] + (lo - yo[p]);
      float* __restrict__ out = yp + lo;
      const int64_t n = hi - lo;
      float ss = 0.f;
      if (mo[p] == 0) {
#pragma omp simd reduction(+ : ss)
        for (int64_t l = 0; l < n; ++l) { const float v = g[l]; out[l] = v; ss += v * v; }
      } else {
        const float* __restrict__ s = tp + to[p] + (lo - yo[p]);
        const float t = ta[p];
#pragma omp simd reduction(+ : ss)
        for (int64_t l = 0; l < n; ++l) {
          const float v = g[l];
          out[l] += (t * s[l]) * v;
          ss += v * v;
        }
      }
      acc[p] += ss;
    }
  }
  for (int64_t p = 0; p < P; ++p) sq[sl[p]] = static_cast<float>(acc[p]);
}
"""

_module: ModuleType | None = None
_tried = False


def mode() -> str:
    """``ACCORD_NATIVE``, checked: one of :data:`CHOICES`."""
    value = os.environ.get("ACCORD_NATIVE", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"ACCORD_NATIVE: got {value!r}; allowed: {', '.join(CHOICES)}")
    return value


def _flags() -> list[str]:
    """Compiler flags for this CPU's vector width (never -march=native: a shared cache
    directory may serve several machines)."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = {"AVX512": ["-mavx512f", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
    return ["-O3", "-fopenmp-simd", *isa.get(capability, [])]


def _build() -> ModuleType:
    """Load the built kernel, building it first if needed (under a file lock)."""
    flags = _flags()
    digest = hashlib.sha256((SOURCE + " ".join(flags) + torch.__version__).encode()
                            ).hexdigest()[:16]
    name = f"accord_sketch_{digest}"
    where = cache_dir("native") / name
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "accord.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        built = sorted(where.glob(f"{name}*.so"))
        if built:
            spec = importlib.util.spec_from_file_location(name, built[-1])
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        log.warning("accord: building the native sketch kernel (once per machine, about "
                    "25 s; ACCORD_NATIVE=off skips it)")
        (where / "lock").unlink(missing_ok=True)  # torch's own lock, left by a killed build
        from torch.utils.cpp_extension import load_inline

        # the ninja of this environment (pip's, in the interpreter's bin) when it is not on
        # the PATH, as under `.venv/bin/python` without an activated venv
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), path])
        try:
            return load_inline(name, cpp_sources=[SOURCE], functions=["sketch_pieces"],
                               extra_cflags=flags, build_directory=str(where), verbose=False)
        finally:
            os.environ["PATH"] = path


def kernel() -> ModuleType | None:
    """The kernel's module, or None (``ACCORD_NATIVE=off``, or ``auto`` where it does not
    build: the reason is logged once). Raises with ``on`` when it cannot be built."""
    global _module, _tried
    choice = mode()
    if choice == "off":
        return None
    if not _tried:
        _tried = True
        try:
            _module = _build()
        except Exception as exc:  # noqa: BLE001 - any build failure falls back
            if choice == "on":
                raise RuntimeError(f"ACCORD_NATIVE=on: the native sketch kernel does not "
                                   f"build here: {exc}") from exc
            log.warning("accord: the native sketch kernel is not available (%s); using "
                        "torch's kernels", str(exc).splitlines()[0] if str(exc) else
                        type(exc).__name__)
    if _module is None and choice == "on":
        raise RuntimeError("ACCORD_NATIVE=on: the native sketch kernel did not build")
    return _module
