"""Opt-in diagnosis: a torch.profiler table of ten engine steps, from inside whatever process runs the engine.

``BLOCKS_ENGINE_PROFILE=/path/prefix`` makes :class:`~blocks.engine.core.EngineCore` profile its steps
``START`` to ``START + 9`` and write ``/path/prefix.<pid>.txt``: their wall time, then the operators by self
CPU time and by self GPU time. The served engine runs in its own process (see ``engine_proc``), which no
outside profiler reaches; the offline engine writes the same table, so the two can be compared.
"""

from __future__ import annotations

import os
import time

__all__ = ["StepProfiler", "triton_variants"]

START, COUNT = 300, 10


class StepProfiler:
    """Call :meth:`before_step` at the start of every step; does nothing unless the variable is set."""

    def __init__(self) -> None:
        self.prefix = os.environ.get("BLOCKS_ENGINE_PROFILE")
        self.steps = 0
        self._prof = None

    def before_step(self) -> None:
        if not self.prefix:
            return
        n, self.steps = self.steps, self.steps + 1
        if n == START:
            import torch

            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._t = time.perf_counter()
        elif n == START + COUNT and self._prof is not None:
            wall = time.perf_counter() - self._t
            self._prof.__exit__(None, None, None)
            avg = self._prof.key_averages()
            with open(f"{self.prefix}.{os.getpid()}.txt", "w") as f:
                f.write(f"{COUNT} steps in {wall * 1e3:.1f} ms\n")
                f.write(avg.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
                for key in ("self_device_time_total", "self_cuda_time_total"):  # renamed across torch versions
                    try:
                        f.write(avg.table(sort_by=key, row_limit=25, max_name_column_width=60))
                        break
                    except (AttributeError, KeyError, ValueError):
                        continue
            self._prof = None
            self.prefix = None


def triton_variants() -> dict[str, int]:
    """Compiled variants of each of this package's Triton kernels in this process (kernels never compiled
    are left out; empty under the Triton interpreter).

    A kernel compiles once per combination of its constexprs and of the specializations of its other
    arguments; a count that grows during a run means compiles (about a second each) inside steps.
    """
    import sys

    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    counts: dict[str, int] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "blocks" or name.startswith("blocks.")):
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, JITFunction):
                continue
            n = 0
            for entry in getattr(obj, "device_caches", {}).values():  # device -> (kernel cache, ...)
                if isinstance(entry, tuple) and entry and isinstance(entry[0], dict):
                    n += len(entry[0])
            if n:
                counts[getattr(obj, "__name__", repr(obj))] = n
    return counts
