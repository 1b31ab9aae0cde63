"""`python -m minidpo ...` is the `minidpo` command."""

import sys

from .cli import main

sys.exit(main())
