"""`python -m minidpo ...` is the `minidpo` command."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing was started
    print("minidpo: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
