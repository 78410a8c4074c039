import sys

from tunequeue.cli import main

sys.exit(main())
