"""Known errors on the command line: one line that says what was wrong and how to fix it, not a traceback.

The project's own checks raise ValueError (a bad value or name), FileNotFoundError (a missing file or checkpoint)
and DataUnavailable (a dataset that cannot be fetched); `short_errors` prints those as `<program>: error: <msg>`
and exits with status 1. Anything else keeps its traceback. BACKDOOR_BENCH_DEBUG=1 keeps every traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from datamodules.datasets.download import DataUnavailable

KNOWN = (ValueError, FileNotFoundError, DataUnavailable)
UNION = re.compile(r"Does not validate against any of the Union subtypes.*?Errors: - (.*?)"
                   r" - Expected a <class 'NoneType'>")


@contextmanager
def short_errors(program: str) -> Iterator[None]:
    try:
        yield
    except KNOWN as err:
        if os.environ.get("BACKDOOR_BENCH_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(err).split())
        nested = UNION.search(message)  # jsonargparse: a class's own error inside its "Union subtypes" report
        if nested:
            message = nested.group(1)
        print(f"{program}: error: {message}\n(the traceback: BACKDOOR_BENCH_DEBUG=1)", file=sys.stderr)
        raise SystemExit(1) from None
