"""README.md runs verbatim: every ```bash and ```python block, top to bottom, in one shell.

Run alone with ``python -m pytest tests/test_readme.py``. The blocks run in a temporary copy of the
repository's tracked files, as one bash script (so ``export``, ``cd`` and background servers carry
from one block to the next, as in a terminal); a python block runs as ``python - <<EOF``. The two
set-up blocks (``pip install ...``) are the install and CI commands: they are checked against
``.ci/run``, not run. Usage synopses are ```text blocks and are not run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"bash", "python"}
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = "@@README block"
TIMEOUT_S = 2400  # the whole README took about 16 min on 2 cores at load average 10-13


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # line of the opening fence in README.md

    @property
    def setup(self) -> bool:
        return "pip install" in self.code


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of ``text``, in order."""
    return [
        Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def readme_script(blocks: list[Block]) -> str:
    """One bash script running ``blocks`` in order, printing a marker line before each."""
    lines = [
        "set -eo pipefail",
        "trap 'jobs -p | xargs -r kill 2>/dev/null || true' EXIT",  # servers started with &
    ]
    for i, block in enumerate(blocks):
        lines.append(f'echo "{MARK} {i} (README.md line {block.line}, {block.lang}) at $SECONDS s"')
        if block.lang == "python":
            assert "README_PY_EOF" not in block.code
            lines += ["python - <<'README_PY_EOF'", block.code.rstrip("\n"), "README_PY_EOF"]
        else:
            lines.append(block.code.rstrip("\n"))
    lines.append(f'echo "{MARK} end at $SECONDS s"')
    return "\n".join(lines) + "\n"


def _copy_tracked_files(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for name in files.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())


def test_readme_blocks_are_labelled_and_setup_matches_ci() -> None:
    blocks = readme_blocks(README.read_text())
    assert blocks, "no code blocks found"
    unlabelled = [b.line for b in blocks if b.lang not in RUNNABLE | {"text"}]
    assert not unlabelled, f"README blocks without bash/python/text language at lines {unlabelled}"
    setup = [b for b in blocks if b.setup]
    assert len(setup) == 2, "expected two set-up blocks: install + demo, then the test command"
    install, tests = (b.code.strip() for b in setup)
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci_command, "the README's test command and .ci/run differ"
    assert install.startswith(tests.split(" && pip install -e")[0]), (
        "install and test commands install torch differently"
    )
    assert all(b.lang == "bash" for b in setup)


def test_readme_script_stops_at_the_failing_block(tmp_path: Path) -> None:
    blocks = readme_blocks(
        "```bash\necho one\n```\n\n```python\nraise SystemExit(3)\n```\n\n```bash\necho never\n```\n"
    )
    result = subprocess.run(
        ["bash", "-c", readme_script(blocks)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 3
    assert "one" in result.stdout and "never" not in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith(f"{MARK} 1 (README.md line 5, python)")


@pytest.mark.slow
def test_readme_runs_verbatim(tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks(README.read_text()) if b.lang in RUNNABLE and not b.setup]
    _copy_tracked_files(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONUNBUFFERED="1",
    )
    script = tmp_path / "readme.sh"
    script.write_text(readme_script(blocks))
    start = time.perf_counter()
    with subprocess.Popen(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    markers = [line for line in output.splitlines() if line.startswith(MARK)]
    tail = "\n".join(output.splitlines()[-60:])
    assert process.returncode == 0, (
        f"README failed in {markers[-1] if markers else 'setup'} "
        f"(exit {process.returncode}, {time.perf_counter() - start:.0f} s):\n{tail}"
    )
    new = {p.name for p in tmp_path.iterdir()} - before - {"readme.sh"}
    assert new <= {"runs"}, f"README blocks wrote outside runs/: {sorted(new)}"


def test_readme_shows_what_the_arithmetic_engine_returns() -> None:
    from pimoe.compute import ArithmeticEngine

    shown = repr(ArithmeticEngine().evaluate("123456789*987654321"))
    assert f"# {shown}" in README.read_text()
