"""Why a replay's weights differ from the recorded run's: each recorded difference, ranked.

A run promises the same weights bit for bit on the same software, device type and code
(:mod:`trainer.determinism`). When a replay breaks that, :func:`diagnose` compares what the
run recorded with what the replay recorded:

1. the config (canonical JSON): each field that differs, or that one side lacks (a config
   class that gained or lost a field);
2. the code digest: each recipe or dataset module whose source changed, appeared or went;
3. the environment (:func:`trainer.determinism.environment`): each key whose value
   differs, judged by what it does to the arithmetic on the device the runs used (a cuDNN
   switch cannot change a CPU run much; a thread count cannot change a GPU run much); the
   keys only one side recorded (a record from an older evp) are named together, as not
   comparable, last;
4. every difference becomes a :class:`Cause` with a likelihood (0-100) from the table
   below, sorted most likely first (ties keep the order of steps 1-3).

No difference at all means the promise itself was broken: :data:`BROKEN_PROMISE`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BROKEN_PROMISE = "no recorded difference: this is a broken exactness promise — report it"


@dataclass(frozen=True)
class Cause:
    """One recorded difference that may explain differing weights."""

    key: str  #: ``config.<field>``, ``code.<module>`` or an environment key
    then: Any
    now: Any
    likelihood: int  #: 0-100: how likely this difference alone changes the weights
    explanation: str  #: one line: what differs, then and now, and why it matters

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "then": self.then, "now": self.now, "likelihood": self.likelihood,
                "explanation": self.explanation}


@dataclass(frozen=True)
class Rule:
    """How much an environment key matters on a GPU run and on a CPU run, and why."""

    on_gpu: int
    on_cpu: int
    why: str


#: What each recorded environment key does to the arithmetic. A key not listed here is
#: named with :data:`UNKNOWN` likelihood.
RULES: dict[str, Rule] = {
    "machine": Rule(95, 95, "another processor architecture runs other kernels"),
    "byteorder": Rule(95, 95, "another byte order runs other kernels"),
    "gpu_name": Rule(90, 0, "GPU models run different kernels and reduction orders"),
    "device_name": Rule(90, 45, "another GPU or CPU model may run other kernels"),
    "gpu_capability": Rule(88, 0, "another compute capability selects other kernels"),
    "world_size": Rule(95, 95, "data-parallel ranks each see their own slice and gradients are averaged across them"),
    "torch": Rule(85, 85, "kernels differ between releases"),
    "backend": Rule(60, 60, "another collective backend reduces gradients in another order"),
    "trainer_code": Rule(80, 80, "evp's training loop, sampler, model building or switches changed"),
    "deterministic_algorithms": Rule(78, 60, "without it, nondeterministic kernels may run"),
    "deterministic_warn_only": Rule(75, 55, "nondeterministic kernels run with only a warning"),
    "matmul_allow_tf32": Rule(75, 5, "TF32 matmuls round inputs to 10 mantissa bits"),
    "cudnn_allow_tf32": Rule(72, 5, "TF32 convolutions round inputs to 10 mantissa bits"),
    "float32_matmul_precision": Rule(75, 40, "a lower precision lets matmuls use TF32 or bfloat16"),
    "cudnn_deterministic": Rule(72, 5, "cuDNN may pick nondeterministic algorithms"),
    "cudnn_benchmark": Rule(70, 5, "cuDNN's autotuner may pick other kernels from run to run"),
    "cuda": Rule(70, 5, "cuBLAS and the CUDA kernels differ between CUDA releases"),
    "cpu_capability": Rule(20, 70, "vectorized CPU kernels for another instruction set accumulate in another order"),
    "torch_threads": Rule(10, 65, "CPU reductions split by thread count"),
    "cublas_workspace_config": Rule(65, 3, "cuBLAS picks its reduction strategy by workspace"),
    "mkldnn_enabled": Rule(5, 50, "oneDNN and the native CPU kernels round differently"),
    "cudnn": Rule(50, 0, "cuDNN releases ship other convolution and RNN kernels"),
    "cpu_model": Rule(10, 45, "another CPU model may select other kernels"),
    "gpu_driver": Rule(40, 0, "the driver compiles kernels shipped as PTX, and that code may differ"),
    "matmul_allow_fp16_reduced_precision": Rule(30, 3, "float16 matmuls may reduce in lower precision"),
    "matmul_allow_bf16_reduced_precision": Rule(30, 3, "bfloat16 matmuls may reduce in lower precision"),
    "numpy": Rule(25, 25, "NumPy's seeding and conversions may differ between releases"),
    "python": Rule(20, 20, "a Python release rarely changes the arithmetic, its random module is stable"),
    "fill_uninitialized_memory": Rule(15, 15, "only a kernel that reads memory it never wrote sees the difference"),
    "torch_interop_threads": Rule(15, 15, "inter-op threads only schedule independent ops"),
    "platform": Rule(10, 10, "the operating system and C library rarely change the arithmetic"),
}
CONFIG = 100  #: a field of the config: the run trained something else
DEVICE_TYPE = 97  #: CPU against GPU
CODE = 92  #: the recipe's or dataset's module
UNKNOWN = 20  #: an environment key :data:`RULES` does not know
NOT_COMPARABLE = 1  #: keys only one side recorded (named together, as one cause)
#: Recorded for the record's sake (the device_name of a CPU run is platform.processor()),
#: or covered by another key: never a cause on its own when the other key is recorded.
COVERED_BY = {"device_name": ("gpu_name", "cpu_model")}
#: What describes the device itself: told by the device type's cause when that differs.
_DEVICE_FACTS = frozenset({"device_name", "gpu_name", "gpu_capability", "gpu_driver", "cudnn"})


def diagnose(environment_then: Mapping[str, Any], environment_now: Mapping[str, Any], *,
             config_then: str = "{}", config_now: str = "{}", code_then: Mapping[str, str] | None = None,
             code_now: Mapping[str, str] | None = None) -> list[Cause]:
    """Every recorded difference between a run and its replay, most likely cause first; see the module docstring."""
    causes = [*_config_causes(config_then, config_now), *_code_causes(code_then or {}, code_now or {}),
              *_environment_causes(environment_then, environment_now)]
    return sorted(causes, key=lambda cause: -cause.likelihood)  # stable: ties keep steps 1-3's order


def explain(causes: list[Cause]) -> list[str]:
    """The lines a person reads: one per cause, or :data:`BROKEN_PROMISE` when there is none."""
    return [cause.explanation for cause in causes] or [BROKEN_PROMISE]


def _config_causes(then: str, now: str) -> list[Cause]:
    old, new = json.loads(then), json.loads(now)
    causes = []
    for name in sorted(set(old) | set(new)):
        if old.get(name, _ABSENT) != new.get(name, _ABSENT):
            a, b = old.get(name, _ABSENT), new.get(name, _ABSENT)
            causes.append(Cause(f"config.{name}", _plain(a), _plain(b), CONFIG,
                                f"config field {name} {_shown(a)} then, {_shown(b)} now: the replay trained "
                                "with another config"))
    return causes


def _code_causes(then: Mapping[str, str], now: Mapping[str, str]) -> list[Cause]:
    causes = []
    for module in sorted(set(then) | set(now)):
        a, b = then.get(module), now.get(module)
        if a != b:
            causes.append(Cause(f"code.{module}", a, b, CODE,
                                f"code of module {module} {_digest(a)} then, {_digest(b)} now: the recipe or dataset "
                                "may compute something else"))
    return causes


def _environment_causes(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[Cause]:
    on_gpu = "cuda" in (then.get("device_type"), now.get("device_type"))
    causes, unrecorded = [], []
    for key in sorted(set(then) | set(now), key=_table_order):
        a, b = then.get(key, _ABSENT), now.get(key, _ABSENT)
        if a == b or _covered(key, then, now):
            continue
        if key == "device_type":
            causes.append(Cause(key, a, b, DEVICE_TYPE, f"device {_device(then)} then, {_device(now)} now: CPU and "
                                                        "GPU kernels round differently"))
        elif a is _ABSENT or b is _ABSENT:
            unrecorded.append(key)
        else:
            rule = RULES.get(key)
            likelihood = UNKNOWN if rule is None else rule.on_gpu if on_gpu else rule.on_cpu
            why = "a difference evp does not know how to judge" if rule is None else rule.why
            causes.append(Cause(key, a, b, likelihood, f"{key} {_shown(a)} then, {_shown(b)} now: {why}"))
    if unrecorded:
        side = "then" if all(key not in then for key in unrecorded) else "by one of the runs"
        causes.append(Cause("unrecorded", {k: _plain(then.get(k, _ABSENT)) for k in unrecorded},
                            {k: _plain(now.get(k, _ABSENT)) for k in unrecorded}, NOT_COMPARABLE,
                            f"{', '.join(unrecorded)} not recorded {side} (a record from another evp release): "
                            "these cannot be compared"))
    return causes


class _Absent:
    def __repr__(self) -> str:
        return "not recorded"


_ABSENT: Any = _Absent()


def _table_order(key: str) -> tuple[int, str]:
    order = ["device_type", *RULES]
    return (order.index(key), key) if key in order else (len(order), key)


def _covered(key: str, then: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    """Whether ``key``'s difference is told by a key both sides recorded, or by the device type."""
    if key in _DEVICE_FACTS and then.get("device_type") != now.get("device_type"):
        return True  # the device type's cause names the GPU
    return any(other in then and other in now for other in COVERED_BY.get(key, ()))


def _device(environment: Mapping[str, Any]) -> str:
    kind = str(environment.get("device_type", "?"))
    name = environment.get("gpu_name") or environment.get("device_name")
    return f"{kind} ({name})" if kind == "cuda" and name else kind


def _plain(value: Any) -> Any:
    return None if value is _ABSENT else value


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "not recorded"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value != "" else '""'


def _digest(value: str | None) -> str:
    return "absent" if value is None else f"sha256 {value[:12]}…"
