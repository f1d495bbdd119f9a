"""Every switch that makes a training run repeatable, in one place.

Exactness is promised only within the same PyTorch release, platform and device type:
floating-point kernels differ between CPU and GPU, between GPU models and between
releases. :func:`environment` records those facts with each run, so a replay can tell a
broken promise from a run on different software.
"""

from __future__ import annotations

import os

# cuBLAS picks a nondeterministic reduction strategy unless its workspace is fixed, and it
# reads this variable once, when the first cuBLAS handle is created (on the first CUDA
# matmul). It must therefore be set at import time of this module, before any CUDA work:
# `torch.use_deterministic_algorithms(True)` refuses CUDA matmuls without it. Importing
# torch itself does not initialize CUDA, so setting it here, first, is early enough.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG

import platform  # noqa: E402  (after the variable above, on purpose)
import random  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402  (a submodule `import torch` may not load)

from events.errors import ConfigurationError  # noqa: E402
from trainer.config import check_device_name  # noqa: E402


def make_deterministic(seed: int) -> None:
    """Seed every generator and turn on every determinism switch PyTorch has.

    Call it once at the start of a run, before the model is built.
    """
    # The three global generators: Python's, NumPy's legacy one, torch's (CPU and all CUDA
    # devices; torch.manual_seed seeds both).
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed is limited to 32 bits.
    torch.manual_seed(seed)
    # Raise on any op that has no deterministic implementation instead of silently
    # running a nondeterministic one (scatter_add on CUDA, some index_put paths, ...).
    torch.use_deterministic_algorithms(True)
    # With deterministic algorithms on, torch also fills every new uninitialized tensor
    # (torch.empty, resized outputs) with NaN or the largest integer, so that a kernel that
    # reads memory it never wrote fails loudly. That costs a write per allocation and buys
    # no exactness: a correct kernel overwrites every element, and our results are compared
    # by weights hash anyway. Turn it off for speed.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    # cuDNN: no autotuner (it may pick different kernels from run to run) and only
    # deterministic convolution algorithms.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # TF32 is deterministic on one GPU model but rounds differently from full float32;
    # keeping full precision makes GPU results closer to CPU ones and to older GPUs.
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    # Re-assert the cuBLAS workspace in case something changed it after import; it only
    # takes effect if CUDA has not created its cuBLAS handle yet.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG


#: Intra-op CPU threads while training; see :func:`fixed_cpu_threads`.
TRAINING_CPU_THREADS = 1


@contextmanager
def fixed_cpu_threads(count: int = TRAINING_CPU_THREADS) -> Iterator[None]:
    """Run the block with exactly ``count`` intra-op CPU threads, then restore the old count.

    CPU matmul kernels may split reductions by thread count, so equal weights need an equal
    count, whatever the machine's core count. For a model this small one thread is also
    the fastest: with two threads on a busy two-core machine a step took ten times longer.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def select_device(name: str) -> torch.device:
    """Turn a config's device name into a device: "auto" means CUDA when present, else CPU."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(f"device {name!r} was requested but CUDA is not available")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        return device
    return torch.device("cpu")


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """The software and hardware a run's exactness depends on; recorded with every run.

    Only plain strings, numbers and booleans, so the dict can go into JSON and Avro.
    """
    device = device if device is not None else select_device("auto")
    on_cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "byteorder": sys.byteorder,
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "numpy": np.__version__,
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else (platform.processor() or platform.machine()),
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if on_cuda else "",  # type: ignore[no-untyped-call]
        # CPU kernels may split reductions by thread count, so it is part of the record.
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        # Read back rather than assumed: evidence of what cuBLAS was given.
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
    }
