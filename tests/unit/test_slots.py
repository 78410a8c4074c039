"""A worker's device slots: never two jobs on one slot, multi-device leases, waits that time out, and the
highest-priority waiter served first."""

import threading
import time

import pytest

from worker.slots import Slots


def test_leases_never_share_a_slot_and_pin_gpus():
    slots = Slots.from_spec("gpu:0,1,2,3")
    first = slots.acquire(2)
    second = slots.acquire(2)
    assert first.ids == ["0", "1"] and second.ids == ["2", "3"]
    assert first.environment() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert slots.acquire(1, timeout=0.05) is None  # all taken
    slots.release(first)
    assert slots.acquire(1).ids == ["0"]
    assert slots.describe() == {"kind": "gpu", "total": 4, "free": 1, "devices": ["0", "1", "2", "3"]}
    with pytest.raises(ValueError, match="has 4 gpu slots"):
        slots.acquire(5)


def test_cpu_slots_hide_gpus():
    lease = Slots.from_spec("cpu:2").acquire(2)
    assert lease.names == ["cpu:0", "cpu:1"] and lease.environment()["CUDA_VISIBLE_DEVICES"] == ""


def test_waiters_are_served_by_priority_then_arrival():
    slots = Slots.from_spec("cpu:1")
    held = slots.acquire(1)
    order: list[str] = []

    def wait(name: str, priority: int) -> None:
        lease = slots.acquire(1, priority)
        order.append(name)
        time.sleep(0.05)
        slots.release(lease)

    threads = []
    for name, priority in (("low", 1), ("top", 9), ("mid", 5), ("mid-later", 5)):
        thread = threading.Thread(target=wait, args=(name, priority))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)  # arrive in this order
    slots.release(held)
    for thread in threads:
        thread.join(timeout=5)
    assert order == ["top", "mid", "mid-later", "low"]


def test_a_big_lease_waits_for_enough_free_slots():
    slots = Slots.from_spec("cpu:3")
    a, b = slots.acquire(1), slots.acquire(1)
    got = []
    thread = threading.Thread(target=lambda: got.append(slots.acquire(3, timeout=5)))
    thread.start()
    time.sleep(0.1)
    assert not got
    slots.release(a)
    time.sleep(0.1)
    assert not got  # two free of three: still waiting
    slots.release(b)
    thread.join(timeout=5)
    assert got and got[0].ids == ["0", "1", "2"]
