"""Loading a benchmark script (`benchmarks/<name>.py`) as a module, to call its `main` in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script `benchmarks/<name>.py` as module `bench_<name>` (registered in sys.modules: dataclasses in
    a script look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, argv: list[str]) -> int:
    """`benchmarks/<name>.py`'s `main(argv)` in-process, the torch thread count it may pin restored after."""
    import torch

    threads = torch.get_num_threads()
    try:
        return load_benchmark(name).main(argv)
    finally:
        torch.set_num_threads(threads)
