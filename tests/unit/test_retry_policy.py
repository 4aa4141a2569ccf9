"""RetryPolicy: which exceptions earn another attempt, and how long to wait before it."""

from __future__ import annotations

import asyncio
import random

import pytest

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.tasks import RetryPolicy, Router


class _FixedRandom(random.Random):
    """A Random whose ``random()`` always returns ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


NO_JITTER = _FixedRandom(0.0)


def test_delay_grows_exponentially() -> None:
    policy = RetryPolicy(retries=10, backoff=0.5, backoff_max=1_000.0, jitter=0.0)
    delays = [policy.delay(attempt, random.Random(1)) for attempt in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(retries=50, backoff=1.0, backoff_max=5.0, jitter=0.0)
    assert [policy.delay(n, NO_JITTER) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    # Far beyond the cap (2**99 seconds uncapped) it stays at the cap.
    assert policy.delay(100, NO_JITTER) == 5.0


def test_jitter_bounds() -> None:
    policy = RetryPolicy(retries=5, backoff=2.0, backoff_max=60.0, jitter=0.25)
    # Attempt 3: base 8 s, scaled by a factor in [1 - jitter, 1].
    assert policy.delay(3, _FixedRandom(0.0)) == 8.0
    assert policy.delay(3, _FixedRandom(0.5)) == pytest.approx(7.0)
    assert policy.delay(3, _FixedRandom(0.999999)) == pytest.approx(6.0, abs=1e-5)
    rng = random.Random(42)
    samples = [policy.delay(3, rng) for _ in range(2_000)]
    assert all(6.0 < s <= 8.0 for s in samples)
    # Spread over the range, not stuck at one end.
    assert min(samples) < 6.1 and max(samples) > 7.9


def test_jitter_applies_to_the_capped_delay() -> None:
    policy = RetryPolicy(retries=5, backoff=1.0, backoff_max=3.0, jitter=0.5)
    rng = random.Random(7)
    samples = [policy.delay(6, rng) for _ in range(1_000)]  # uncapped base would be 32 s
    assert all(1.5 < s <= 3.0 for s in samples)


def test_full_jitter_and_zero_backoff() -> None:
    assert RetryPolicy(retries=1, backoff=0.0).delay(1, random.Random(3)) == 0.0
    full = RetryPolicy(retries=1, backoff=4.0, jitter=1.0)
    assert 0.0 < full.delay(1, _FixedRandom(0.75)) == pytest.approx(1.0)


# -- which exceptions retry ---------------------------------------------------------------------


def test_retries_counts_extra_attempts() -> None:
    policy = RetryPolicy(retries=2)
    assert policy.should_retry(ValueError(), 1)
    assert policy.should_retry(ValueError(), 2)
    assert not policy.should_retry(ValueError(), 3)
    assert not RetryPolicy().should_retry(ValueError(), 1)


def test_retry_on_matches_subclasses() -> None:
    policy = RetryPolicy(retries=3, retry_on=(OSError,))
    assert policy.should_retry(OSError("x"), 1)
    assert policy.should_retry(ConnectionError("reset"), 1)
    assert policy.should_retry(ConnectionRefusedError("refused"), 1)
    assert policy.should_retry(TimeoutError("slow"), 1)  # TimeoutError is an OSError


def test_retry_on_does_not_match_unrelated_exceptions() -> None:
    policy = RetryPolicy(retries=3, retry_on=(OSError, KeyError))
    assert policy.should_retry(KeyError("k"), 1)
    assert not policy.should_retry(ValueError("v"), 1)
    assert not policy.should_retry(LookupError("base class of KeyError"), 1)
    assert not policy.should_retry(RuntimeError(), 1)


def test_empty_retry_on_retries_exceptions_but_not_base_exceptions() -> None:
    policy = RetryPolicy(retries=1)
    assert policy.should_retry(RuntimeError(), 1)
    assert not policy.should_retry(asyncio.CancelledError(), 1)
    assert not policy.should_retry(KeyboardInterrupt(), 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retries": -1},
        {"backoff": -0.1},
        {"backoff_max": -1.0},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"retry_on": (ValueError, "OSError")},
        {"retry_on": (int,)},
    ],
)
def test_invalid_policy_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_task_decorator_builds_the_policy() -> None:
    router = Router()

    @router.task(
        retry=4, retry_on_exc=[OSError], retry_backoff=0.01, retry_backoff_max=0.5, retry_jitter=0.1
    )
    def fetch() -> None:
        """Fetch."""

    policy = router.definitions["fetch"].retry
    assert policy == RetryPolicy(4, (OSError,), 0.01, 0.5, 0.1)
    with pytest.raises(ConfigurationError, match="retry_on_exc"):
        router.task(name="bad", retry_on_exc=["OSError"])(lambda: None)
