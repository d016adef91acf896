"""Run every benchmark script in this folder (``make bench``); modules the scripts import
(no ``__main__`` block) are skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    for script in sorted(HERE.glob("*.py")):
        if script.name == Path(__file__).name or "__main__" not in script.read_text():
            continue
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script)], check=True)
