"""The allocator preloaded into the recipe's processes: jemalloc where the system has it (auto), none when
asked (system), or a given library; whatever the operator already preloads is kept; a path that is no file
is refused when the settings are read, naming the variable."""

import ctypes.util
import subprocess
import sys

import pytest

from shared.settings import InvalidSettings, Settings, get_settings
from worker.runner import allocator
from worker.runner.child import recipe_environment


def test_system_preloads_nothing_and_a_path_goes_first(tmp_path):
    library = tmp_path / "liballoc.so"
    library.write_bytes(b"")
    assert allocator.environment("system", {"LD_PRELOAD": "libx.so"}) == {}
    assert allocator.environment(str(library), {"LD_PRELOAD": "libx.so"}) == {"LD_PRELOAD": f"{library} libx.so"}
    assert allocator.environment(str(library), {"LD_PRELOAD": str(library)}) == {}


def test_a_missing_file_is_refused_naming_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEQUEUE_TRAINING_ALLOCATOR", str(tmp_path / "nothing.so"))
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidSettings, match="TUNEQUEUE_TRAINING_ALLOCATOR"):
            get_settings()
    finally:
        get_settings.cache_clear()
    assert Settings(training_allocator="system").training_allocator == "system"


@pytest.mark.skipif(ctypes.util.find_library("jemalloc") is None, reason="no jemalloc here (libjemalloc2)")
def test_the_recipe_process_runs_on_jemalloc(monkeypatch):
    monkeypatch.delenv("TUNEQUEUE_TRAINING_ALLOCATOR", raising=False)
    get_settings.cache_clear()
    env = recipe_environment({}, None)
    maps = "print(open('/proc/self/maps').read())"
    loaded = subprocess.run([sys.executable, "-c", maps], env=env, capture_output=True, text=True, check=True)
    assert "libjemalloc" in loaded.stdout
    # with its settings read: freed pages go back after 1 s, not jemalloc's default 10 s
    decay = (
        "import ctypes; v, n = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t)); "
        "assert ctypes.CDLL(None).mallctl(b'opt.dirty_decay_ms', ctypes.byref(v), ctypes.byref(n), None, 0) == 0; "
        "print(v.value)"
    )
    read = subprocess.run([sys.executable, "-c", decay], env=env, capture_output=True, text=True, check=True)
    assert read.stdout.split() == ["1000"]
    # an operator's own settings are theirs (they reach the process with the rest of the environment)
    assert "MALLOC_CONF" not in allocator.environment("auto", {"MALLOC_CONF": "dirty_decay_ms:2000"})
    monkeypatch.setenv("TUNEQUEUE_TRAINING_ALLOCATOR", "system")
    get_settings.cache_clear()
    plain = subprocess.run([sys.executable, "-c", maps], env=recipe_environment({}, None), capture_output=True,
                           text=True, check=True)  # fmt: skip
    assert "libjemalloc" not in plain.stdout
    get_settings.cache_clear()
