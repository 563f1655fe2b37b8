"""The README's one test command installs what the tests need, and CI runs exactly that command."""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_block(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_test_command_installs_the_test_extra_then_runs_pytest():
    (command,) = _bash_block("Tests")
    steps = [s.strip() for s in command.split("&&")]
    assert steps[0] == "pip install torch==2.13.0"          # torch first: the pinned CPU wheel
    assert steps[1] == 'pip install -e ".[test]"'
    assert steps[-1] == "python -m pytest -q"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(e.startswith("pytest") and not e.startswith("pytest-") for e in extras)


def test_ci_reads_the_same_command_from_the_readme():
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"test_command=\$\((awk .*?)\)\n", script).group(1)
    got = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert got.strip() == _bash_block("Tests")[0]
    assert 'bash -euo pipefail -c "$test_command"' in script


def test_main_command_is_one_line_that_installs_and_runs():
    (command,) = _bash_block("Main command")
    assert command.startswith("pip install torch==2.13.0 && pip install . && lazarus ")
