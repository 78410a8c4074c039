"""`python -m worker.inference`: an inference worker (what `tunequeue worker --inference` runs)."""

import argparse
import logging
import sys

from worker.inference.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.inference", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--advertise-url")
    parser.add_argument("--models", default="", help="comma-separated base model ids to load and serve only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    return serve(args.host, args.port, args.advertise_url, models)


if __name__ == "__main__":
    sys.exit(main())
