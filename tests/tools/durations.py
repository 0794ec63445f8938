"""A pytest plugin that writes each test's total time (setup + call + teardown) to a JSON file.

python -m pytest -p tests.tools.durations ...   (CHOLINE_DURATIONS_FILE names the file)
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

_TIMES: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: Any) -> None:
    _TIMES[report.nodeid] += float(getattr(report, "duration", 0.0) or 0.0)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("CHOLINE_DURATIONS_FILE")
    if path:
        with open(path, "w") as fh:
            json.dump(dict(_TIMES), fh, indent=1, sort_keys=True)
