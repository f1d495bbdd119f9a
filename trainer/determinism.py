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

import functools  # noqa: E402  (after the variable above, on purpose)
import hashlib  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402  (a submodule `import torch` may not load)

from events.errors import ConfigurationError  # noqa: E402
from trainer.config import check_device_name  # noqa: E402


#: What :func:`make_deterministic` sets ``torch.utils.deterministic.fill_uninitialized_memory``
#: to (see there; bench/bench_training.py measures both).
FILL_UNINITIALIZED_MEMORY = True


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
    # reads memory it never wrote gives the same (loudly wrong) result every time instead of
    # whatever the allocator's memory held. Kept on: on the digits recipe it costs nothing
    # measurable (bench/bench_training.py, bench/README.md), and it closes the one way a
    # buggy kernel would make weights differ from run to run.
    torch.utils.deterministic.fill_uninitialized_memory = FILL_UNINITIALIZED_MEMORY  # type: ignore[attr-defined]
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
    """The software, hardware and switches a run's exactness depends on; recorded with every run.

    1. only plain strings, numbers and booleans, so the dict can go into JSON and Avro;
    2. every switch is read back as it is in force now (called at the end of a run, after
       :func:`make_deterministic`), never assumed;
    3. the GPU's fields (``gpu_*``, ``cudnn``) are ``""`` when ``device`` is not CUDA;
       ``cuda`` is the CUDA release torch was built with (``""`` for a CPU-only build);
    4. the keys of older records (python .. cublas_workspace_config) keep their meaning, so
       old run records still compare key by key.

    The facts that cannot change within a process (CPU and GPU model, driver, the source
    digest) are read once: checkpoints call this every ``checkpoint_every`` steps.
    """
    device = device if device is not None else select_device("auto")
    on_cuda = device.type == "cuda"
    gpu = _gpu(device.index if device.index is not None else torch.cuda.current_device()) if on_cuda else _NO_GPU
    matmul = torch.backends.cuda.matmul
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "byteorder": sys.byteorder,
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "numpy": np.__version__,
        "device_type": device.type,
        "device_name": gpu["gpu_name"] if on_cuda else (platform.processor() or platform.machine()),
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if on_cuda else "",  # type: ignore[no-untyped-call]
        **gpu,
        "cpu_model": _cpu_model(),
        # The vector instruction set torch's CPU kernels were dispatched to (AVX2, AVX512, ...):
        # different sets accumulate in different orders.
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        # CPU kernels may split reductions by thread count, so it is part of the record.
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill_uninitialized_memory": bool(getattr(torch.utils.deterministic, "fill_uninitialized_memory")),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(matmul.allow_tf32),
        "matmul_allow_fp16_reduced_precision": bool(matmul.allow_fp16_reduced_precision_reduction),
        "matmul_allow_bf16_reduced_precision": bool(matmul.allow_bf16_reduced_precision_reduction),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        # Read back rather than assumed: evidence of what cuBLAS was given.
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
        "trainer_code": trainer_code_digest(),
    }


_NO_GPU = {"gpu_name": "", "gpu_capability": "", "gpu_driver": ""}
#: The modules of this package whose code decides the arithmetic of a run (the others
#: parse, record or report); the ones that exist are digested into ``trainer_code``.
TRAINING_MODULES = ("checkpoint", "config", "data", "determinism", "distributed", "loader", "model", "recipe",
                    "training")


@functools.cache
def trainer_code_digest() -> str:
    """sha256 over the source of :data:`TRAINING_MODULES` (name and bytes of each one present), once per process."""
    digest = hashlib.sha256()
    folder = Path(__file__).resolve().parent
    for name in TRAINING_MODULES:
        path = folder / f"{name}.py"
        if path.is_file():
            source = path.read_bytes()
            digest.update(f"{name}.py {len(source)}\n".encode() + source)
    return digest.hexdigest()


@functools.cache
def _gpu(index: int) -> dict[str, str]:
    """Model, compute capability and driver version of CUDA device ``index``."""
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu_name": torch.cuda.get_device_name(index), "gpu_capability": f"{major}.{minor}",
            "gpu_driver": _gpu_driver(index)}


def _gpu_driver(index: int) -> str:
    """The NVIDIA driver's version, from NVML (pynvml) when it imports, else ``nvidia-smi``; "" when neither answers."""
    try:
        import pynvml  # type: ignore[import-not-found]  # optional; torch.cuda.utilization uses it too

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # not installed, no NVML library, no driver: try the command line
        pass
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return answer.stdout.strip().splitlines()[0] if answer.stdout.strip() else ""


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (x86 ``model name``, ARM ``Model`` or ``CPU part``), else platform's."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "CPU part"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()
