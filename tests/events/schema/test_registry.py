"""The schema registry: ids, versions, BACKWARD checks, and racing registrars."""

from __future__ import annotations

import json
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource

from events.adapters.kafka import admin as kafka_admin
from tests.support.examples import catalog as examples_catalog
from events.schema.codec import Codec
from events.errors import IncompatibleSchema, SchemaError, ServiceUnavailable
from events.schema import registry as registry_module
from events.adapters import kafka as kafka_adapter
from events.schema.registry import (
    MAX_RECORD_BYTES, MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_ID, KafkaSchemaLog, MemorySchemaLog, SchemaLog,
    SchemaRegistry, json_depth,
)
from events.settings import Settings


def schema(*fields: dict[str, Any], name: str = "Thing") -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "t", "fields": list(fields)}


V1 = schema({"name": "a", "type": "string"})
V2 = schema({"name": "a", "type": "string"}, {"name": "b", "type": "int", "default": 0})
V3 = schema({"name": "a", "type": "string"}, {"name": "b", "type": "long", "default": 0})
BREAKING = schema({"name": "a", "type": "string"}, {"name": "c", "type": "int"})


def distinct(name: str) -> dict[str, Any]:
    """A schema nobody else registers."""
    return schema({"name": "a", "type": "string"}, name=name)


class InterleavingLog:
    """A shared log that runs ``before_append`` once, just before the next append lands.

    It stands for another process whose records reach the log between this registrar's
    read and its append: the worst interleaving for id arbitration.
    """

    def __init__(self, log: SchemaLog) -> None:
        self._log = log
        self.before_append: Callable[[], object] | None = None

    def append(self, key: bytes, value: bytes) -> None:
        hook, self.before_append = self.before_append, None
        if hook is not None:
            hook()
        self._log.append(key, value)

    def read_all(self) -> list[tuple[bytes, bytes]]:
        return self._log.read_all()


def compacted(records: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """What Kafka's log compaction may leave: the last record per key, in log order."""
    last = {key: index for index, (key, _) in enumerate(records)}
    return [record for index, record in enumerate(records) if last[record[0]] == index]


class ListLog:
    def __init__(self, records: list[tuple[bytes, bytes]]) -> None:
        self.records = records

    def append(self, key: bytes, value: bytes) -> None:
        self.records.append((key, value))

    def read_all(self) -> list[tuple[bytes, bytes]]:
        return list(self.records)


def assignment(registry: SchemaRegistry, subjects: list[str]) -> dict[int, tuple[str, int]]:
    return {v.id: (v.subject, v.version) for s in subjects for v in registry.versions(s)}


# -- one registrar ----------------------------------------------------------------


def test_ids_start_at_one_and_registering_again_writes_nothing() -> None:
    log = MemorySchemaLog()
    registry = SchemaRegistry(log)
    assert registry.register("s", V1) == 1
    assert registry.register("s", json.loads(json.dumps(V1))) == 1
    respelled = {"name": "t.Thing", "type": "record", "fields": [{"type": {"type": "string"}, "name": "a"}]}
    assert registry.register("s", respelled) == 1
    assert len(log.read_all()) == 1


def test_versions_and_latest() -> None:
    registry = SchemaRegistry(MemorySchemaLog())
    assert registry.latest("s") is None
    first, second = registry.register("s", V1), registry.register("s", V2)
    assert (first, second) == (1, 2)
    versions = registry.versions("s")
    assert [(v.id, v.version) for v in versions] == [(1, 1), (2, 2)]
    latest = registry.latest("s")
    assert latest is not None and latest.schema == V2 and latest.subject == "s"
    assert registry.get(1).schema == V1


def test_ids_are_global_across_subjects() -> None:
    registry = SchemaRegistry(MemorySchemaLog())
    assert [registry.register(s, V1) for s in ("a", "b", "c")] == [1, 2, 3]
    assert registry.latest("b") is not None and registry.latest("b").version == 1  # type: ignore[union-attr]


def test_incompatible_version_is_refused_and_nothing_is_written() -> None:
    log = MemorySchemaLog()
    registry = SchemaRegistry(log)
    registry.register("s", V1)
    with pytest.raises(IncompatibleSchema) as caught:
        registry.register("s", BREAKING)
    assert (caught.value.subject, caught.value.field) == ("s", "c")
    assert len(log.read_all()) == 1
    assert [v.version for v in registry.versions("s")] == [1]


def test_only_the_latest_version_is_checked() -> None:
    registry = SchemaRegistry(MemorySchemaLog())
    registry.register("s", V1)
    registry.register("s", V2)
    registry.register("s", V3)  # int -> long against V2
    assert registry.register("s", V2) == 2  # an old version again: its id, no check, no write
    with pytest.raises(IncompatibleSchema, match="'b'"):
        registry.register("s", V2 | {"doc": "new"})  # long -> int against V3


def test_unknown_id_is_looked_up_in_the_log_once_then_refused() -> None:
    log = MemorySchemaLog()
    reader, writer = SchemaRegistry(log), SchemaRegistry(log)
    with pytest.raises(SchemaError, match="schema id 1 "):
        reader.get(1)
    writer.register("s", V1)
    assert reader.get(1).schema == V1


def test_invalid_schema_is_a_schema_error() -> None:
    with pytest.raises(SchemaError):
        SchemaRegistry(MemorySchemaLog()).register("s", {"type": "record", "name": "X", "fields": [{"name": "a"}]})


def test_foreign_records_in_the_log_are_ignored() -> None:
    log = MemorySchemaLog()
    log.append(b"noise", b"not json")
    log.append(b"{}", json.dumps({"id": 1, "subject": "s"}).encode())
    registry = SchemaRegistry(log)
    assert registry.register("s", V1) == 2  # no claim, but its sane id 1 is used up all the same
    assert registry.get(2).schema == V1
    with pytest.raises(SchemaError, match="schema id 1 "):
        registry.get(1)


def test_records_have_the_confluent_shape() -> None:
    log = MemorySchemaLog()
    SchemaRegistry(log).register("topic-t.Thing", V1)
    (key, value), = log.read_all()
    record = json.loads(value)
    assert {k: record[k] for k in ("id", "subject", "version")} == {"id": 1, "subject": "topic-t.Thing", "version": 1}
    assert json.loads(record["schema"]) == V1
    assert json.loads(key)["id"] == 1


# -- racing registrars ------------------------------------------------------------


def test_interleaved_claims_for_one_id_never_share_it() -> None:
    shared = InterleavingLog(MemorySchemaLog())
    alice, bob = SchemaRegistry(shared), SchemaRegistry(shared)
    alice.latest("warm-up")  # alice has read the (empty) log: she will claim id 1
    results: dict[str, int] = {}
    shared.before_append = lambda: results.setdefault("bob", bob.register("b", distinct("B")))
    results["alice"] = alice.register("a", distinct("A"))
    assert results == {"bob": 1, "alice": 2}
    assert len(shared.read_all()) == 3  # alice's lost claim for id 1 stays, ignored
    for registry in (alice, bob, SchemaRegistry(shared)):
        assert registry.get(1).subject == "b" and registry.get(2).subject == "a"


def test_interleaved_versions_of_one_subject_never_share_a_version() -> None:
    shared = InterleavingLog(MemorySchemaLog())
    alice, bob = SchemaRegistry(shared), SchemaRegistry(shared)
    alice.register("s", V1)
    bob.latest("s")
    shared.before_append = lambda: alice.register("s", V2)
    third = bob.register("s", V3)  # bob checked V3 against V1; it must be re-checked against V2
    fresh = SchemaRegistry(shared)
    assert [(v.version, v.schema) for v in fresh.versions("s")] == [(1, V1), (2, V2), (3, V3)]
    assert fresh.latest("s").id == third  # type: ignore[union-attr]


def test_interleaved_incompatible_version_is_refused_after_the_race() -> None:
    shared = InterleavingLog(MemorySchemaLog())
    alice, bob = SchemaRegistry(shared), SchemaRegistry(shared)
    alice.register("s", V1)
    alice.register("s", V2)
    bob.versions("s")
    shared.before_append = lambda: alice.register("s", V3)
    with pytest.raises(IncompatibleSchema):
        bob.register("s", V2 | {"doc": "V2 again, now behind V3"})  # fine against V2, not against V3
    assert [v.schema for v in SchemaRegistry(shared).versions("s")] == [V1, V2, V3]


def test_the_same_schema_registered_in_a_race_gets_one_id() -> None:
    shared = InterleavingLog(MemorySchemaLog())
    alice, bob = SchemaRegistry(shared), SchemaRegistry(shared)
    alice.latest("s")
    shared.before_append = lambda: bob.register("s", V1)
    assert alice.register("s", V1) == bob.register("s", V1)
    assert len(SchemaRegistry(shared).versions("s")) == 1


def test_threads_on_one_log_never_share_an_id() -> None:
    log = MemorySchemaLog()
    registries = [SchemaRegistry(log) for _ in range(6)]
    got: dict[tuple[int, int], int] = {}
    barrier = threading.Barrier(len(registries))

    def work(index: int, registry: SchemaRegistry) -> None:
        barrier.wait()
        for n in range(15):
            got[(index, n)] = registry.register(f"s{index}-{n}", distinct(f"T{index}x{n}"))

    threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(registries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 6 * 15
    assert len(set(got.values())) == len(got)
    fresh = SchemaRegistry(log)
    for (index, n), schema_id in got.items():
        assert fresh.get(schema_id).subject == f"s{index}-{n}"


def test_compaction_keeps_the_winning_claims() -> None:
    shared = InterleavingLog(MemorySchemaLog())
    alice, bob = SchemaRegistry(shared), SchemaRegistry(shared)
    alice.latest("x")
    shared.before_append = lambda: bob.register("b", distinct("B"))
    alice.register("a", distinct("A"))
    subjects = ["a", "b"]
    before = assignment(SchemaRegistry(shared), subjects)
    assert assignment(SchemaRegistry(ListLog(compacted(shared.read_all()))), subjects) == before


def test_unreachable_broker_is_service_unavailable() -> None:
    with pytest.raises(ServiceUnavailable, match="kafka at 127.0.0.1:1"):
        KafkaSchemaLog(Settings(kafka="127.0.0.1:1", topic_prefix="evp-test-unreachable"), timeout_s=1)


# -- hostile records: every reader folds them alike ------------------------------


def nested(depth: int) -> Any:
    """An Avro schema whose JSON nests ``depth`` levels: arrays of arrays of ... of int."""
    node: Any = "int"
    for _ in range(depth):
        node = {"type": "array", "items": node}
    return node


def nested_text(depth: int) -> str:
    """The JSON of :func:`nested`, written without recursion (json.dumps recurses)."""
    return '{"type":"array","items":' * depth + '"int"' + "}" * depth


def raw_claim(schema_id: Any, subject: str = "s", version: Any = 1, schema_text: Any = None) -> tuple[bytes, bytes]:
    """A record in the claim's shape with any fields at all, as a forger could append it."""
    text = json.dumps(V1) if schema_text is None else schema_text
    value = json.dumps({"id": schema_id, "subject": subject, "version": version, "schema": text}).encode()
    return json.dumps({"id": str(schema_id)[:20], "claim": uuid.uuid4().hex}).encode(), value


def frames() -> int:
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back  # type: ignore[assignment]
    return depth


def fold_with_low_recursion_limit(log: SchemaLog, headroom: int = 120) -> SchemaRegistry:
    """A fresh registry that folds the log with only ``headroom`` frames to spare.

    Enough for any schema inside the caps (they need about 40); far too few for the
    schemas that poisoned the registry before the caps.
    """
    registry, old = SchemaRegistry(log), sys.getrecursionlimit()
    sys.setrecursionlimit(frames() + headroom)
    try:
        registry.ids()
    finally:
        sys.setrecursionlimit(old)
    return registry


def fold_deep_in_the_stack(log: SchemaLog, spare: int = 150) -> SchemaRegistry:
    """A fresh registry that folds the log from a stack already ``limit - spare`` frames deep."""
    registry = SchemaRegistry(log)

    def descend(left: int) -> None:
        if left > 0:
            descend(left - 1)
        else:
            registry.ids()

    descend(sys.getrecursionlimit() - frames() - spare)
    return registry


def folded(registry: SchemaRegistry) -> tuple[dict[int, tuple[str, int, str]], int, int]:
    """What a reader made of the log: every id's (subject, version, schema), its highest id and position."""
    ids = {i: (e.subject, e.version, json.dumps(e.schema, sort_keys=True)) for i, e in registry.ids().items()}
    return ids, registry.highest_id, registry.position


def readers_agree(log: SchemaLog, *others: SchemaRegistry) -> tuple[dict[int, tuple[str, int, str]], int, int]:
    """Fresh, low-limit, deep-stack and incremental readers all fold ``log`` to the same state."""
    views = [folded(r) for r in (SchemaRegistry(log), fold_with_low_recursion_limit(log),
                                 fold_deep_in_the_stack(log), *others)]
    assert all(view == views[0] for view in views), views
    return views[0]


def test_the_deep_schema_that_poisoned_the_registry_is_now_refused_by_every_reader(
        caplog: pytest.LogCaptureFixture) -> None:
    log = MemorySchemaLog()
    # Deep enough to pass a parser with a fresh stack and to fail one with a deeper stack.
    log.append(*raw_claim(1, subject="poison", schema_text=nested_text(700)))
    log.append(*raw_claim(2, subject="poison", schema_text=nested_text(9_000)))
    server = SchemaRegistry(log)
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        assert server.register("s", V1) == 3  # both poisoned ids are used up, neither reused
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 2 and "#0" in warnings[0] and "#1" in warnings[1], warnings
    assert all(f"deeper than {MAX_SCHEMA_DEPTH}" in w and "key b'" in w for w in warnings), warnings
    ids, highest, position = readers_agree(log, server)
    assert list(ids) == [3] and highest == 3 and position == 3
    for name, reader in (("T", fold_with_low_recursion_limit(log)), ("U", fold_deep_in_the_stack(log))):
        assert reader.register(name, distinct(name)) == reader.highest_id  # each reader's next claim is fresh
    assert sorted(SchemaRegistry(log).ids()) == [3, 4, 5]


@pytest.mark.parametrize("schema_id", [0, -1, MAX_SCHEMA_ID + 1, 2**32 - 1, 10**30, "1", 1.0, True, None, [1]])
def test_absurd_ids_claim_nothing_and_use_nothing_up(schema_id: Any) -> None:
    log = MemorySchemaLog()
    log.append(*raw_claim(schema_id))
    assert SchemaRegistry(log).register("s", V1) == 1
    readers_agree(log)


def test_an_id_that_skips_ahead_is_refused_so_one_record_cannot_use_up_the_id_space() -> None:
    log = MemorySchemaLog()
    log.append(*raw_claim(MAX_SCHEMA_ID, subject="squatter"))
    log.append(*raw_claim(5, subject="squatter"))
    registry = SchemaRegistry(log)
    assert registry.register("s", V1) == 1 and registry.register("s", V2) == 2
    assert registry.subjects() == ("s",)
    readers_agree(log, registry)


def test_a_forged_record_with_a_sane_id_uses_it_up_in_every_reader() -> None:
    log = MemorySchemaLog()
    registry = SchemaRegistry(log)
    assert registry.register("s", V1) == 1
    for value in (raw_claim(2, schema_text="{not json")[1], raw_claim(3, version=0)[1],
                  raw_claim(4, schema_text=json.dumps({"type": "record", "name": "X"}))[1],
                  raw_claim(5, schema_text='{"type": "fixed", "name": "F", "size": 1' + "0" * 30 + "}")[1]):
        log.append(b"forged", value)
    log.append(b"not json", b"\xff\xfe")
    log.append(b"huge", b" " * MAX_RECORD_BYTES)
    log.append(b"big schema", raw_claim(6, schema_text=json.dumps({**V1, "doc": "x" * MAX_SCHEMA_BYTES}))[1])
    assert registry.register("s", V2) == 7
    ids, highest, position = readers_agree(log, registry)
    assert sorted(ids) == [1, 7] and highest == 7 and position == 9


def test_register_refuses_schemas_over_the_caps_and_writes_nothing() -> None:
    log = MemorySchemaLog()
    registry = SchemaRegistry(log)
    for schema, named in ((nested(MAX_SCHEMA_DEPTH + 1), "deeper"), (nested(100_000), "deeper"),
                          ({**V1, "doc": "x" * MAX_SCHEMA_BYTES}, "bytes")):
        with pytest.raises(SchemaError, match=named):
            registry.register("s", schema)
        with pytest.raises(SchemaError, match=named):
            registry.lookup("s", schema)
    assert log.read_all() == []
    assert registry.register("s", nested(MAX_SCHEMA_DEPTH)) == 1  # at the cap is fine
    assert readers_agree(log, registry)[0][1][0] == "s"


def test_register_refuses_a_claim_once_ids_are_used_up() -> None:
    log = MemorySchemaLog()
    registry = SchemaRegistry(log)
    registry.register("s", V1)
    registry._state.highest_id = MAX_SCHEMA_ID  # as after 2**31 - 1 registrations
    with pytest.raises(SchemaError, match="every schema id"):
        registry.register("t", V1)
    assert len(log.read_all()) == 1


def test_a_reader_that_cannot_evaluate_a_record_stops_there_instead_of_skipping_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log = MemorySchemaLog()
    SchemaRegistry(log).register("s", V1)

    def exhausted(schema: Any) -> str:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(registry_module, "canonical_json", exhausted)
    reader = SchemaRegistry(log)
    with pytest.raises(SchemaError, match="#0 .* could not be evaluated here .*RecursionError"):
        reader.ids()
    assert (reader.position, reader.highest_id) == (0, 0)  # nothing applied, nothing skipped
    monkeypatch.undo()
    assert folded(reader) == folded(SchemaRegistry(log))


def test_json_depth_counts_structure_not_strings_and_never_recurses() -> None:
    assert json_depth('{"a": "[[[{{{", "b": [1, {"c": "\\"]]]"}]}') == 3
    assert json_depth("[" * 10**6) == MAX_SCHEMA_DEPTH + 1  # stops at the first level past the cap
    assert json_depth('"unterminated [[[') == 0
    assert json_depth('\\"' * 10**5 + "[[") == 0  # one unterminated string, matched once, not once per quote
    assert json_depth('["' + '\\"' * 10**5 + '", [[]]]') == 3


RAW_RECORDS = st.one_of(
    st.builds(lambda n, s: ("claim", n, s), st.integers(-2, 3), st.sampled_from(["a", "b"])),  # near the next id
    st.builds(lambda d: ("deep", d, ""), st.integers(MAX_SCHEMA_DEPTH, 3000)),
    st.builds(lambda n: ("absurd", n, ""), st.sampled_from([0, -7, MAX_SCHEMA_ID, 2**32 - 1, 10**25])),
    st.builds(lambda b: ("bytes", b, ""), st.binary(max_size=60)),
    st.builds(lambda t: ("schema", t, ""), st.text(max_size=40)),
    st.builds(lambda s: ("register", 0, s), st.sampled_from(["a", "b", "c"])),
)


@hypothesis_settings(max_examples=150, deadline=None)
@given(records=st.lists(RAW_RECORDS, max_size=14))
def test_every_reader_folds_any_log_to_the_same_ids(records: list[tuple[str, Any, str]]) -> None:
    """Raw records of every kind, and real registrations, in any order: readers agree on every id."""
    log = MemorySchemaLog()
    follower = SchemaRegistry(log)  # reads after every record: the incremental path
    registrar = SchemaRegistry(log)
    schemas = iter(distinct(f"T{n}") for n in range(100))
    for kind, arg, subject in records:
        highest = follower.highest_id
        if kind == "claim":
            version = len(follower.versions(subject)) + 1
            log.append(*raw_claim(highest + arg, subject, version, json.dumps(next(schemas))))
        elif kind == "deep":
            log.append(*raw_claim(highest + 1, schema_text=nested_text(arg)))
        elif kind == "absurd":
            log.append(*raw_claim(arg))
        elif kind == "bytes":
            log.append(b"raw", arg)
        elif kind == "schema":
            log.append(*raw_claim(highest + 1, schema_text=arg))
        else:
            assert registrar.register(f"{subject}{len(log.read_all())}", next(schemas)) == registrar.highest_id
        follower.ids()
    ids, highest, position = readers_agree(log, follower, registrar)
    assert position == len(log.read_all())
    assert all(0 < i <= highest for i in ids)
    versions = [(subject, version) for subject, version, _ in ids.values()]
    assert len(set(versions)) == len(versions)  # one id per (subject, version)
    new_id = SchemaRegistry(log).register("fresh", distinct("Fresh"))
    assert new_id == highest + 1 and new_id not in ids  # no id any reader saw is handed out again


# -- against the real broker ------------------------------------------------------


@pytest.fixture
def admin() -> Iterator[KafkaAdminClient]:
    client = kafka_admin(Settings.from_env())
    yield client
    client.close()


@pytest.fixture
def kafka_topic(admin: KafkaAdminClient) -> Iterator[tuple[Settings, str]]:
    """Settings whose schema topic is this test's own, deleted afterwards."""
    own = Settings.from_env().with_(topic_prefix=f"evp-test-{uuid.uuid4().hex}")
    topic = own.schemas_topic
    yield own, topic
    if topic in admin.list_topics():
        admin.delete_topics([topic])


@pytest.mark.services
def test_kafka_log_creates_a_single_partition_topic_that_keeps_every_record(
    kafka_topic: tuple[Settings, str], admin: KafkaAdminClient
) -> None:
    own, topic = kafka_topic
    KafkaSchemaLog(own).close()
    KafkaSchemaLog(own).close()  # exists already: fine
    (described,) = admin.describe_topics([topic])
    assert len(described["partitions"]) == 1
    wanted = ["cleanup.policy", "retention.ms", "retention.bytes"]
    configs = admin.describe_configs([ConfigResource("topic", topic, wanted)])["topic"][topic]
    assert {k: configs[k]["value"] for k in wanted} == {"cleanup.policy": "delete", "retention.ms": "-1",
                                                       "retention.bytes": "-1"}


@pytest.mark.services
def test_a_schema_topic_an_older_evp_compacted_is_set_to_keep_every_record(
    kafka_topic: tuple[Settings, str], admin: KafkaAdminClient
) -> None:
    own, topic = kafka_topic
    kafka_adapter.ensure_topic(own, topic, 1, {"cleanup.policy": "compact"})
    KafkaSchemaLog(own).close()
    configs = admin.describe_configs([ConfigResource("topic", topic, ["cleanup.policy", "retention.ms"])])
    assert configs["topic"][topic]["cleanup.policy"]["value"] == "delete"
    assert configs["topic"][topic]["retention.ms"]["value"] == "-1"


@pytest.mark.services
def test_kafka_registrars_in_threads_never_share_an_id(kafka_topic: tuple[Settings, str]) -> None:
    own, topic = kafka_topic
    logs = [KafkaSchemaLog(own) for _ in range(2)]
    got: dict[str, int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(logs))

    def work(name: str, log: KafkaSchemaLog) -> None:
        registry = SchemaRegistry(log)
        try:
            barrier.wait()
            for n in range(8):
                got[f"{name}{n}"] = registry.register(f"{topic}-{name}{n}", distinct(f"{name}{n}"))
            got[f"shared-by-{name}"] = registry.register(f"{topic}-shared", V1)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name, log)) for name, log in zip("AB", logs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
    assert not errors, errors
    assert got["shared-by-A"] == got["shared-by-B"]
    unique = {k: v for k, v in got.items() if not k.startswith("shared")}
    assert len(set(unique.values())) == len(unique) == 16
    assert got["shared-by-A"] not in unique.values()

    fresh_log = KafkaSchemaLog(own)
    try:
        fresh = SchemaRegistry(fresh_log)
        for name, schema_id in unique.items():
            registered = fresh.get(schema_id)
            assert (registered.subject, registered.schema) == (f"{topic}-{name}", distinct(name))
        assert [v.id for v in fresh.versions(f"{topic}-shared")] == [got["shared-by-A"]]
        assert sorted(v.id for s in [*unique, "shared"] for v in fresh.versions(f"{topic}-{s}")) == sorted(
            {*unique.values(), got["shared-by-A"]})
    finally:
        fresh_log.close()


@pytest.mark.services
def test_kafka_registry_refuses_incompatible_versions_without_writing(kafka_topic: tuple[Settings, str]) -> None:
    own, topic = kafka_topic
    log = KafkaSchemaLog(own)
    try:
        registry = SchemaRegistry(log)
        assert registry.register("s", V1) == 1
        assert registry.register("s", V1) == 1
        with pytest.raises(IncompatibleSchema):
            registry.register("s", BREAKING)
        assert len(log.read_all()) == 1
    finally:
        log.close()


@pytest.mark.services
def test_kafka_codec_values_decode_in_another_registry(kafka_topic: tuple[Settings, str]) -> None:
    own, topic = kafka_topic
    writer_log, reader_log = KafkaSchemaLog(own), KafkaSchemaLog(own)
    try:
        datum = {"sample_id": "s", "annotator_id": "a", "features": [0.5] * 64, "label": 3, "source": "digits:0"}
        encoded = Codec(SchemaRegistry(writer_log), examples_catalog(), "evp.events").encode("SampleSubmitted", datum)
        decoded = Codec(SchemaRegistry(reader_log), examples_catalog(), "evp.events").decode(encoded.value)
        assert (decoded.schema_id, decoded.event_type, decoded.datum) == (
            encoded.schema_id, "digits.SampleSubmitted", datum)
    finally:
        writer_log.close()
        reader_log.close()


@pytest.mark.services
def test_kafka_the_deep_schema_poisoning_is_harmless(kafka_topic: tuple[Settings, str]) -> None:
    own, topic = kafka_topic
    writer_log = KafkaSchemaLog(own)
    try:
        writer_log.append(*raw_claim(1, subject="poison", schema_text=nested_text(700)))
        assert SchemaRegistry(writer_log).register("s", V1) == 2
    finally:
        writer_log.close()
    logs = [KafkaSchemaLog(own) for _ in range(3)]
    try:
        low, deep = fold_with_low_recursion_limit(logs[1]), fold_deep_in_the_stack(logs[2])
        views = [folded(SchemaRegistry(logs[0])), folded(low), folded(deep)]
        assert views[0] == views[1] == views[2] and list(views[0][0]) == [2] and views[0][1] == 2
        assert low.register("t", distinct("T")) == 3
        assert deep.register("u", distinct("U")) == 4
    finally:
        for log in logs:
            log.close()


@pytest.mark.services
def test_a_kafka_log_whose_consumer_stopped_fetching_makes_a_new_one_and_loses_and_repeats_no_record(
    kafka_topic: tuple[Settings, str]
) -> None:
    """A consumer that answers every poll with nothing (as one did after a broker restart and
    an outage) fails that read, and the next read starts a new consumer past the records read."""
    own, _ = kafka_topic
    log = KafkaSchemaLog(own, timeout_s=2)
    try:
        for i in range(3):
            log.append(b"k%d" % i, b"v%d" % i)
        assert [k for k, _ in log.read_all()] == [b"k0", b"k1", b"k2"]
        stuck = log._consumer
        stuck.poll = lambda **_: {}  # the fetcher that never brings a record again
        log.append(b"k3", b"v3")
        with pytest.raises(ServiceUnavailable, match="no records from .* before offset 4"):
            log.read_all()
        assert log._consumer is None  # the stuck one was closed
        log.append(b"k4", b"v4")
        assert log.read_all() == [(b"k%d" % i, b"v%d" % i) for i in range(5)]
        assert log._consumer is not stuck
    finally:
        log.close()
