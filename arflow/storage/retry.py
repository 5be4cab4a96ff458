"""Bounded retries for storage requests: one policy for data, checkpoints and the run lock.

Transient failures (connection refused or reset, timeouts, truncated HTTP bodies, 5xx answers
such as S3's 503 SlowDown) are retried with exponential backoff and jitter, and a server's
``Retry-After`` is honoured (up to ``max_delay``); after ``attempts`` tries a
:class:`StorageError` names the URL. Permanent failures are not retried: a missing object raises
``FileNotFoundError`` for the caller to name, refused access raises :class:`StorageError` at
once. Each retry is logged when it happens.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

log = logging.getLogger("arflow.storage")

T = TypeVar("T")

_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)

# Jitter comes from its own generator: retries must not move any seeded random stream.
_jitter = random.Random()


class StorageError(RuntimeError):
    """Storage could not be reached or refused access (after bounded retries for transient
    failures). The message names the URL."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed (network trouble, timeouts, server errors)."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError and s3fs's translation of 5xx
        return True
    # botocore's and aiohttp's network errors do not derive from OSError; import them only if in use.
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None and isinstance(
        exc, (botocore.HTTPClientError, botocore.ConnectionError)
    ):
        return True
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, aiohttp.ClientError)


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked to wait (an HTTP ``Retry-After`` header: seconds or a date) in
    `exc` or the errors it was raised from (s3fs keeps botocore's answer as the cause)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            value = {k.lower(): v for k, v in headers.items()}.get("retry-after")
            if value is not None:
                return _parse_retry_after(str(value))
        exc = exc.__cause__ or exc.__context__
    return None


def error_code(exc: BaseException) -> str | None:
    """The S3 error code (``NoSuchKey``, ``InvalidRange``, ``SlowDown``...) in ``exc`` or the
    errors it was raised from (s3fs keeps botocore's answer as the cause)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "Code" in response.get("Error", {}):
            return str(response["Error"]["Code"])
        exc = exc.__cause__ or exc.__context__
    return None


def _parse_retry_after(value: str) -> float | None:
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """How patiently storage is used: ``attempts`` tries per request; between them the backoff
    base_delay * 2**i seconds (capped at max_delay) with jitter (a uniform draw from its upper
    half, so that ranks retrying together spread out), or the server's Retry-After when it asks
    for longer (capped at max_delay); per-request timeouts in seconds for object stores
    (connecting, and waiting for each part of an answer; ``commit_timeout`` instead for the answer
    to an uploaded file: completing a multipart upload of a GB-sized checkpoint file takes a
    loopback moto server longer than ``read_timeout``, and S3 may take minutes)."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    commit_timeout: float = 120.0

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        wait = _jitter.uniform(backoff / 2, backoff)
        asked = retry_after(exc) if exc is not None else None
        if asked is not None:
            wait = max(wait, min(asked, self.max_delay))
        return wait

    def call(self, url: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a storage request about ``url``), retrying transient failures."""
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:  # classified below; everything else propagates unchanged
                if isinstance(exc, PermissionError):
                    raise StorageError(
                        f"{url}: access denied ({exc}); check the credentials (AWS_ACCESS_KEY_ID / "
                        f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the endpoint URL"
                    ) from exc
                if not is_transient(exc):
                    raise
                if attempt == self.attempts:
                    raise StorageError(
                        f"{url}: gave up after {attempt} attempts in "
                        f"{time.monotonic() - started:.1f} s: {type(exc).__name__}: {exc}"
                    ) from exc
                wait = self.delay(attempt, exc)
                log.warning(
                    "%s: transient %s (%s); retry %d/%d in %.2f s",
                    url,
                    type(exc).__name__,
                    exc,
                    attempt,
                    self.attempts - 1,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")
