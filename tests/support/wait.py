"""Waiting on a condition with a deadline: the one polling loop of the test suite."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 30, interval: float = 0.05, what: str = "condition") -> T:
    """Return condition()'s first truthy value, or fail after ``timeout`` seconds.

    ``condition`` may raise to give up at once (a process it waits on has died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
