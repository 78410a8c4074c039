"""Device slots of one worker: GPUs (`--devices 0,1,2,3`, pinned with CUDA_VISIBLE_DEVICES) or CPU slots
(`--cpu-slots N`). A job takes as many as it asks for, or waits; a slot is never given to two jobs."""

import itertools
import os
import threading
import time
from dataclasses import dataclass

ENV = "TUNEQUEUE_WORKER_DEVICES"  # "gpu:0,1,2,3" or "cpu:2", set by `tunequeue worker`


@dataclass
class Lease:
    kind: str
    ids: list[str]

    @property
    def names(self) -> list[str]:
        return [f"{self.kind}:{i}" for i in self.ids]

    def environment(self) -> dict[str, str]:
        """What the recipe's process sees: only its own GPUs."""
        if self.kind == "gpu":
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.ids)}
        return {"CUDA_VISIBLE_DEVICES": "", "TUNEQUEUE_CPU_SLOTS": ",".join(self.ids)}


class Slots:
    def __init__(self, kind: str, ids: list[str]):
        if kind not in ("gpu", "cpu") or not ids:
            raise ValueError(f"worker devices must be gpu:<ids> or cpu:<n>, got {kind}:{ids}")
        self.kind, self.ids = kind, ids
        self.free = list(ids)
        self.condition = threading.Condition()
        self.waiting: list[tuple[int, int]] = []  # (-priority, arrival) of threads waiting for slots
        self._arrivals = itertools.count()
        self._memory: int | None = None

    @classmethod
    def from_spec(cls, spec: str) -> "Slots":
        kind, _, rest = spec.partition(":")
        if kind == "cpu":
            return cls("cpu", [str(i) for i in range(int(rest or 1))])
        return cls(kind, [i for i in rest.split(",") if i])

    @classmethod
    def from_env(cls) -> "Slots":
        return cls.from_spec(os.environ.get(ENV, "cpu:1"))

    @property
    def total(self) -> int:
        return len(self.ids)

    def acquire(self, count: int, priority: int = 0, timeout: float | None = None) -> Lease | None:
        """Take `count` free slots, waiting up to `timeout` seconds (None: forever); None if they did not
        free up in time. Among waiters, the highest priority (then the earliest) is served first."""
        if count > self.total:
            raise ValueError(f"this worker has {self.total} {self.kind} slots; a job asked for {count}")
        ticket = (-priority, next(self._arrivals))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.condition:
            self.waiting.append(ticket)
            try:
                while len(self.free) < count or min(self.waiting) != ticket:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self.condition.wait(left)
                taken, self.free = self.free[:count], self.free[count:]
                return Lease(self.kind, taken)
            finally:
                self.waiting.remove(ticket)
                self.condition.notify_all()  # the next waiter in line may fit now

    def release(self, lease: Lease) -> None:
        with self.condition:
            self.free = sorted(self.free + lease.ids, key=self.ids.index)
            self.condition.notify_all()

    def describe(self) -> dict:
        with self.condition:
            described = {"kind": self.kind, "total": self.total, "free": len(self.free), "devices": list(self.ids)}
        memory = self.memory_bytes()
        if not memory:
            return described
        return {**described, "memory_bytes": memory, "compute_bytes": compute_bytes(self.kind)}

    def memory_bytes(self) -> int:
        """What one slot offers a job (`TUNEQUEUE_SLOT_MEMORY_MB`, else measured once); 0 where unknown."""
        if self._memory is None:
            from shared.settings import get_settings

            configured = get_settings().slot_memory_mb
            self._memory = configured * 2**20 if configured else measured_slot_memory(self.kind, self.ids)
        return self._memory


def measured_slot_memory(kind: str, ids: list[str]) -> int:
    """The smallest of the slots' GPUs (nvidia-smi, CUDA untouched), or the node's RAM shared by its CPU slots."""
    import subprocess

    if kind == "gpu":
        query = ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"]
        try:
            listing = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        sizes = {index.strip(): int(float(mib)) * 2**20 for index, _, mib in
                 (line.partition(",") for line in listing.splitlines()) if mib.strip()}  # fmt: skip
        return min((sizes[i] for i in ids if i in sizes), default=0)
    return node_memory_bytes() // max(len(ids), 1)


def compute_bytes(kind: str) -> int:
    """Bytes per value the recipe computes in on these slots, as `worker.training.model.compute_dtype` decides
    (without importing torch): bf16 on a GPU and on a CPU with AVX512-BF16 or AMX, float32 elsewhere."""
    if kind == "gpu":
        return 2
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return 4
    return 2 if "avx512_bf16" in flags or "amx_tile" in flags else 4


def node_memory_bytes() -> int:
    """`MemTotal` of /proc/meminfo; 0 where it does not say."""
    from shared.proc import kib_field

    return kib_field("/proc/meminfo", "MemTotal")


def detect() -> str:
    """GPUs if nvidia-smi lists any (without initialising CUDA in this process), else one CPU slot."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
        if count:
            return "gpu:" + ",".join(str(i) for i in range(count))
    return "cpu:1"
