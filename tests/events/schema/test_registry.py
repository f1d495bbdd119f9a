"""The schema registry: ids, versions, BACKWARD checks, and racing registrars."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource

from tests.support.examples import catalog as examples_catalog
from events.schema.codec import Codec
from events.errors import IncompatibleSchema, SchemaError, ServiceUnavailable
from events.schema.registry import KafkaSchemaLog, MemorySchemaLog, SchemaLog, SchemaRegistry
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
        self.before_append: Callable[[], None] | None = None

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
    assert registry.register("s", V1) == 1  # a record that is not a claim claims nothing
    assert registry.get(1).schema == V1


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


# -- against the real broker ------------------------------------------------------


@pytest.fixture
def admin() -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=Settings.from_env().kafka, bootstrap_timeout_ms=10_000)
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
def test_kafka_log_creates_a_compacted_single_partition_topic(
    kafka_topic: tuple[Settings, str], admin: KafkaAdminClient
) -> None:
    own, topic = kafka_topic
    KafkaSchemaLog(own).close()
    KafkaSchemaLog(own).close()  # exists already: fine
    (described,) = admin.describe_topics([topic])
    assert len(described["partitions"]) == 1
    configs = admin.describe_configs([ConfigResource("topic", topic, ["cleanup.policy"])])
    assert configs["topic"][topic]["cleanup.policy"]["value"] == "compact"


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
