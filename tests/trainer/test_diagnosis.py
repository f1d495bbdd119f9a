"""A replay whose weights differ says which recorded difference explains it, most likely first."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from events.event import Event
from events.settings import Settings
from events.store.client import EventStore
from tests.trainer.test_runs import PROJECT, fill, run_cli
from trainer.diagnosis import BROKEN_PROMISE, RULES, diagnose, explain
from trainer.recipe import load_recipe
from trainer.runs import ReplayOutcome, RunRecord, train_snapshot

CPU: dict[str, Any] = {
    "python": "3.11.7", "platform": "Linux-6.1-x86_64-with-glibc2.36", "machine": "x86_64", "byteorder": "little",
    "torch": "2.5.1", "numpy": "2.1.0", "device_type": "cpu", "device_name": "x86_64", "cuda": "12.4", "cudnn": "",
    "gpu_name": "", "gpu_capability": "", "gpu_driver": "", "cpu_model": "AMD EPYC 9654", "cpu_capability": "AVX512",
    "torch_threads": 1, "torch_interop_threads": 2, "deterministic_algorithms": True,
    "deterministic_warn_only": False, "fill_uninitialized_memory": True, "cudnn_deterministic": True,
    "cudnn_benchmark": False, "cudnn_allow_tf32": False, "matmul_allow_tf32": False,
    "matmul_allow_fp16_reduced_precision": True, "matmul_allow_bf16_reduced_precision": True,
    "float32_matmul_precision": "highest", "mkldnn_enabled": True, "cublas_workspace_config": ":4096:8",
    "trainer_code": "ab" * 32, "world_size": 1, "backend": "",
}
GPU = CPU | {"device_type": "cuda", "device_name": "NVIDIA H200", "cudnn": "90100", "gpu_name": "NVIDIA H200",
             "gpu_capability": "9.0", "gpu_driver": "550.54.15"}
#: the keys an evp before the full fingerprint recorded
OLD_KEYS = ("python", "platform", "machine", "byteorder", "torch", "numpy", "device_type", "device_name", "cuda",
            "cudnn", "torch_threads", "deterministic_algorithms", "cublas_workspace_config")


def changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    return f"{value}-other" if value else "set"


@pytest.mark.parametrize("base", [CPU, GPU], ids=["cpu", "gpu"])
def test_each_recorded_difference_alone_is_named_as_the_one_cause(base: dict[str, Any]) -> None:
    assert set(RULES) | {"device_type"} >= set(base), "every recorded key has a rule"
    for key in sorted(set(base) - {"device_type", "device_name"}):  # device_name is told by gpu_name / cpu_model
        now = base | {key: changed(base[key])}
        causes = diagnose(base, now)
        assert [c.key for c in causes] == [key], key
        assert (causes[0].then, causes[0].now) == (base[key], now[key])
        assert causes[0].explanation.startswith(f"{key} ") and " then, " in causes[0].explanation
        assert causes[0].explanation.endswith(RULES[key].why)


def test_the_explanations_say_what_differed_then_and_now_and_why() -> None:
    [torch] = diagnose(CPU, CPU | {"torch": "2.6.0"})
    assert torch.explanation == "torch 2.5.1 then, 2.6.0 now: kernels differ between releases"
    [device] = diagnose(GPU, CPU | {"gpu_name": "", "cudnn": ""} | {"gpu_capability": "", "gpu_driver": ""})
    assert device.explanation == "device cuda (NVIDIA H200) then, cpu now: CPU and GPU kernels round differently"
    [threads] = diagnose(CPU, CPU | {"torch_threads": 4})
    assert threads.explanation == "torch_threads 1 then, 4 now: CPU reductions split by thread count"
    [switch] = diagnose(GPU, GPU | {"cudnn_deterministic": False})
    assert switch.explanation.startswith("cudnn_deterministic on then, off now: ")
    [gpu] = diagnose(GPU, GPU | {"gpu_name": "NVIDIA A100-SXM4-80GB", "device_name": "NVIDIA A100-SXM4-80GB"})
    assert gpu.explanation.startswith("gpu_name NVIDIA H200 then, NVIDIA A100-SXM4-80GB now: GPU models")


def test_config_and_code_differences_are_named() -> None:
    then = json.dumps({"epochs": 3, "seed": 1}, sort_keys=True)
    now = json.dumps({"epochs": 3, "seed": 1, "dropout": 0.1}, sort_keys=True)
    causes = diagnose(CPU, CPU, config_then=then, config_now=now, code_then={"lab.recipes": "1" * 64},
                      code_now={"lab.recipes": "2" * 64})
    assert [c.key for c in causes] == ["config.dropout", "code.lab.recipes"]
    assert causes[0].explanation == ("config field dropout not recorded then, 0.1 now: the replay trained with "
                                     "another config")
    assert causes[1].explanation.startswith(f"code of module lab.recipes sha256 {'1' * 12}… then, sha256 {'2' * 12}… "
                                            "now")


def test_causes_are_ranked_most_likely_first_by_the_device_the_runs_used() -> None:
    both = {"torch_threads": 4, "cudnn_benchmark": True}
    assert [c.key for c in diagnose(CPU, CPU | both)] == ["torch_threads", "cudnn_benchmark"]  # cuDNN: no CPU effect
    assert [c.key for c in diagnose(GPU, GPU | both)] == ["cudnn_benchmark", "torch_threads"]
    many = {"device_type": "cuda", "torch": "2.6.0", "python": "3.12.1", "platform": "Linux-6.8"}
    ranked = diagnose(CPU, CPU | many, config_then='{"epochs":3}', config_now='{"epochs":4}')
    assert [c.key for c in ranked] == ["config.epochs", "device_type", "torch", "python", "platform"]
    assert [c.likelihood for c in ranked] == sorted((c.likelihood for c in ranked), reverse=True)


def test_no_recorded_difference_is_a_broken_promise() -> None:
    assert diagnose(GPU, dict(GPU), config_then='{"epochs":3}', config_now='{"epochs":3}',
                    code_then={"m": "1"}, code_now={"m": "1"}) == []
    assert explain([]) == [BROKEN_PROMISE]
    assert BROKEN_PROMISE == "no recorded difference: this is a broken exactness promise — report it"


def test_keys_an_older_record_lacks_are_one_cause_ranked_last() -> None:
    old = {key: CPU[key] for key in OLD_KEYS} | {"torch": "2.4.0"}
    causes = diagnose(old, CPU)
    assert [c.key for c in causes] == ["torch", "unrecorded"]
    unrecorded = causes[-1]
    assert set(unrecorded.now) == set(CPU) - set(OLD_KEYS) and set(unrecorded.then.values()) == {None}
    assert unrecorded.explanation.startswith("gpu_name, ") and "not recorded then" in unrecorded.explanation
    # an older CPU record's device_name is compared when cpu_model cannot be
    [name] = diagnose({"device_type": "cpu", "device_name": "x86_64"}, {"device_type": "cpu", "device_name": "arm"})
    assert name.key == "device_name"


def record(**changes: Any) -> RunRecord:
    base = RunRecord(run_id="run-1", snapshot_id="snap-1", recipe="r:R", dataset="d:D", config_json='{"epochs":3}',
                     environment=dict(CPU), device="cpu", weights_sha256="a" * 64, metrics={"accuracy": 0.9},
                     code_digest={"r": "1" * 64}, replay_of=None)
    return dataclasses.replace(base, **changes)


def test_a_replay_outcome_explains_only_differing_weights() -> None:
    same = ReplayOutcome(record(), record(run_id="run-2", replay_of="run-1", environment=CPU | {"torch_threads": 2}))
    assert same.identical and same.causes() == [] and same.explanation() == []
    broken = ReplayOutcome(record(), record(run_id="run-2", weights_sha256="b" * 64))
    assert broken.causes() == [] and broken.explanation() == [BROKEN_PROMISE]
    explained = ReplayOutcome(record(), record(run_id="run-2", weights_sha256="b" * 64,
                                               environment=CPU | {"torch": "2.6.0"}))
    assert explained.explanation() == ["torch 2.5.1 then, 2.6.0 now: kernels differ between releases"]


@pytest.mark.services
def test_replay_through_the_cli_explains_a_run_recorded_elsewhere(store: EventStore, settings: Settings,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = fill(store, 120)
    recipe = load_recipe(PROJECT, "mlp")
    run = train_snapshot(store, PROJECT, recipe, snapshot, recipe.parse_config(["epochs=2", "device=cpu"]))
    # The same run as recorded on another machine: other weights, another torch and thread count.
    elsewhere = dataclasses.replace(run, run_id="run-elsewhere1", weights_sha256="0" * 64,
                                    environment=run.environment | {"torch": "2.4.0", "torch_threads": 8})
    store.append("training-run-elsewhere1", Event("TrainingRunRecorded", elsewhere.to_event()))
    store.flush()

    assert run_cli(settings, "replay", "training", "run-elsewhere1", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["identical"] is False and report["broken_promise"] is False
    assert [c["key"] for c in report["causes"]] == ["torch", "torch_threads"]
    assert report["causes"][0]["then"] == "2.4.0" and report["causes"][0]["now"] == run.environment["torch"]
    assert report["explanation"][0] == f"torch 2.4.0 then, {run.environment['torch']} now: kernels differ between releases"
    assert report["explanation"][1] == "torch_threads 8 then, 1 now: CPU reductions split by thread count"

    # Only the weights edited: nothing recorded explains it.
    broken = dataclasses.replace(run, run_id="run-broken1", weights_sha256="0" * 64)
    store.append("training-run-broken1", Event("TrainingRunRecorded", broken.to_event()))
    assert run_cli(settings, "replay", "training", "run-broken1") == 1
    out = capsys.readouterr().out
    assert "weights DIFFERENT" in out and f"why:\n  {BROKEN_PROMISE}" in out
