"""The real recipe with one fault injected, run by a worker through TUNEQUEUE_TRAINING_PYTHON (see
`faulty_python`). TUNEQUEUE_TEST_FAULT says which, as `kind:step[:rank]`:
- `raise:S:R`  rank R raises ValueError right after step S (a failure the recipe reports);
- `kill:S`     the process kills itself with SIGKILL right after step S (a crash nothing reports).
With TUNEQUEUE_TEST_FAULT_ONCE=<file>, only the first run faults (it creates the file); with
TUNEQUEUE_TEST_FAULT_GO=<file>, a fault waits until that file exists (the test acts on the job meanwhile).
Under torchrun the ranks run this file instead of `-m worker.training`, so every rank has the fault."""

import os
import runpy
import signal
import sys
import time
from pathlib import Path


def install_fault() -> None:
    spec = os.environ.get("TUNEQUEUE_TEST_FAULT")
    once = os.environ.get("TUNEQUEUE_TEST_FAULT_ONCE")
    if not spec or (once and Path(once).exists()):
        return
    kind, step, *rank = spec.split(":")
    from worker.training import recipe

    original = recipe.TrainingLoop.step

    def step_with_fault(self, batch, epoch):
        original(self, batch, epoch)
        if self.global_step != int(step) or (rank and int(os.environ.get("RANK", "0")) != int(rank[0])):
            return
        if once:
            Path(once).touch()
        go = os.environ.get("TUNEQUEUE_TEST_FAULT_GO")
        while go and not Path(go).exists():
            time.sleep(0.1)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError(f"injected fault after step {step}")

    recipe.TrainingLoop.step = step_with_fault


def main() -> None:
    args = sys.argv[1:]
    if args[:2] == ["-m", "torch.distributed.run"]:  # the launcher: its ranks run this file, not the module
        module = args.index("worker.training")
        sys.argv = ["torchrun", *args[2 : module - 1], __file__, *args[module + 1 :]]
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
        return
    if args[:2] == ["-m", "worker.training"]:
        args = args[2:]
    install_fault()
    sys.argv = ["worker.training", *args]
    runpy.run_module("worker.training", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
