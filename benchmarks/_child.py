"""One benchmark cell in a fresh process under GNU `time -v`: the child's last stdout line (JSON), plus the
whole process's peak RSS and wall time as GNU time reports them. Shared by the scripts that measure memory
per process (lm_fused_step, vs_trl)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

GNU_TIME = Path("/usr/bin/time")
_OWN_LINES = ("\t", "Command exited", "Command terminated")  # GNU time's report, not the child's error


def run_under_gnu_time(command: list[str], timeout: int, error_chars: int = 160) -> dict[str, Any]:
    """The child's JSON with `gnu_time_mb` (None without GNU time) and `process_seconds` added, or
    `{"error": one line}` when it failed or ran past `timeout` seconds."""
    if GNU_TIME.exists():
        command = [str(GNU_TIME), "-v", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith(_OWN_LINES)]
        return {"error": (lines or ["failed"])[-1][:error_chars]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result["gnu_time_mb"] = int(found.group(1)) / 1024 if found else None
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr)
    if wall:
        parts = [float(p) for p in wall.group(1).split(":")]
        result["process_seconds"] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return result
