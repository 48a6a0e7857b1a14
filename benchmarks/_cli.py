"""How every benchmark script ends: bad input is one line on stderr and exit code 2, an interrupt one line
and exit code 130 (the scripts that resume keep what they wrote as they went); neither prints a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from autoprune.errors import AutopruneError


def run(main: Callable[[], object]) -> None:
    prog = Path(sys.argv[0]).name
    try:
        main()
    except AutopruneError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
