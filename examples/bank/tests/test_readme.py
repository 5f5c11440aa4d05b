"""The repository README's Python sample runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_readme_sample_runs_as_written(tmp_path: Path) -> None:
    [sample] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    script = tmp_path / "sample.py"
    script.write_text(sample)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # bank.app's read models go to ./bank.sqlite3
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "account opened"
