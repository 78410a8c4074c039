"""The composition root: the `tunequeue` command (migrations, keys, base models, the API server, workers,
the demo). It is the one package that may import `api`, `shared` and `worker` together."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tunequeue")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
