"""Key partitioning is Kafka's: our cached murmur2 agrees with aiokafka's own partitioner
(which the aiokafka event log no longer calls) and with the hashes of Kafka's Java client."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from qtasks_stream.eventlog.partitioning import _murmur2, murmur2_partition


def test_murmur2_partition_matches_aiokafkas_default_partitioner() -> None:
    rng = random.Random(7)
    partitioner = DefaultPartitioner()
    for partitions in (1, 3, 4, 12):
        everything = list(range(partitions))
        for _ in range(500):
            key = rng.randbytes(rng.randrange(0, 40))
            assert murmur2_partition(key, partitions) == partitioner(key, everything, everything)


def test_murmur2_gives_the_java_clients_hashes() -> None:
    # Kafka's Utils.murmur2 values, as published with Akka's port of it (Murmur2Spec).
    expected = {
        b"1": -1993445489,
        b"12": 126087238,
        b"123": -267702483,
        b"1234": -1614185708,
        b"12345": -1188365604,
    }
    assert {key: _murmur2(key) for key in expected} == expected
    # toPositive(hash) % partitions is the partition.
    assert murmur2_partition(b"1", 10) == (-1993445489 & 0x7FFFFFFF) % 10
