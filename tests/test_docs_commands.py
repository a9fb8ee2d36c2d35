"""The commands written in docs/ stay valid: every ``pimoe ...`` command (and every
``python benchmarks/X.py`` forwarding to ``pimoe bench``) parses with the CLI's own parser, the
few-shot ablation commands select the rows their result files hold, and every
``docs/results/*`` file the docs name exists. Nothing is run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from pimoe.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# A command starts a line, a code span, or follows `&&`, `$(` or `time`.
COMMAND = re.compile(
    r"(?:^|`|&&\s*|\$\(|time\s+)((?:pimoe [a-z]|python benchmarks/)[^`\n]*)", re.MULTILINE
)
# Words standing for a value the reader supplies (FILE, DIR, E, "$M", ...).
PROSE = {"does", "vs"}  # "pimoe does not know", "pimoe vs tool call"
PLACEHOLDER = re.compile(r"^(?:[A-Z_]+|\.\.\.|.*\$.*)$")


def doc_commands(text: str) -> list[str]:
    """Every command in ``text``, continuation lines joined, comments and ``&& ...`` tails cut,
    ``[optional]`` brackets dropped; error messages quoted in prose (``pimoe serve: ...``) skipped."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for match in COMMAND.finditer(text):
        command = match.group(1).split(" #")[0].split("&&")[0].strip()
        command = command.replace("[", "").replace("]", "")
        if re.match(r"pimoe [a-z-]+:", command) or command.split()[1] in PROSE:
            continue
        found.append(command)
    return found


ALL = [(doc.name, command) for doc in DOCS for command in doc_commands(doc.read_text())]


def as_pimoe_args(command: str) -> list[str] | None:
    """``pimoe`` arguments of ``command``; ``python benchmarks/X.py ARGS`` becomes
    ``bench NAME ARGS`` when X.py forwards to ``pimoe bench NAME``; None for other scripts."""
    words = shlex.split(command)
    if words[0] == "pimoe":
        return words[1:]
    script = ROOT / words[1]
    assert script.is_file(), f"{words[1]} does not exist"
    forward = re.search(r'app\(\["bench", "([a-z-]+)"', script.read_text())
    return None if forward is None else ["bench", forward.group(1), *words[2:]]


def parse(args: list[str]) -> None:
    """Parse ``pimoe ARGS`` down to the leaf command (options, choices, types), running nothing."""
    command: click.Command = typer.main.get_command(app)
    ctx = command.make_context("pimoe", list(args))
    while isinstance(command, click.Group):
        name, sub, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert sub is not None and name is not None
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)


def test_commands_were_found() -> None:
    assert len(ALL) > 100
    assert (
        "federated.md",
        "pimoe federate --backend inprocess --he --json docs/results/federate_he.json",
    ) in ALL


@pytest.mark.parametrize(("doc", "command"), ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_doc_command_parses(doc: str, command: str) -> None:
    args = as_pimoe_args(command)
    if args is None:  # a stand-alone script: it exists and declares every flag used
        script = (ROOT / shlex.split(command)[1]).read_text()
        for module in re.findall(r"^from pimoe\.bench import (\w+)$", script, re.M):
            script += (
                ROOT / "src" / "pimoe" / "bench" / f"{module}.py"
            ).read_text()  # shared parser
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", command):
            declared = re.search(rf'add_argument\(\s*"{flag}"', script)
            assert declared, f"{doc}: {command}: no {flag}"
        return
    try:
        parse(args)
    except (click.MissingParameter, click.exceptions.NoArgsIsHelpError):
        pass  # prose naming a command without its arguments (`pimoe compress`, `pimoe chain`)
    except click.BadParameter as err:  # a placeholder value or a file the reader makes first
        message = err.format_message()
        value = re.search(r"(?:Path|File|Directory) '?\"?(.*?)'?\"? does not exist", message)
        invalid = re.search(r"'([^']*)' is not a valid", message)
        named = (value or invalid).group(1) if (value or invalid) else None
        assert value is not None or (named is not None and PLACEHOLDER.match(named)), (
            f"{doc}: {command}: {message}"
        )
    except click.BadOptionUsage as err:  # prose naming an option (`pimoe compress --config`)
        assert "requires an argument" in err.format_message(), f"{doc}: {command}: {err}"
    except click.UsageError as err:  # no such command / option, extra arguments
        pytest.fail(f"{doc}: {command}: {err.format_message()}")


def test_bad_doc_commands_are_caught() -> None:
    """The checks above do fail: an unknown option, subcommand, choice or extra argument."""
    for args in (
        ["federate", "--no-such-option"],
        ["bench", "no-such-bench"],
        ["bench", "computation", "--calls", "nosuch"],
        ["bench", "fusion", "extra"],
    ):
        with pytest.raises(click.UsageError):
            parse(args)


def test_results_named_in_docs_exist() -> None:
    missing = [
        f"{doc.name}: {name}"
        for doc in DOCS
        for name in re.findall(
            r"(?<![\w/])(?:docs/)?results/[\w./-]+\.(?:jsonl|json|png)", doc.read_text()
        )
        if not (ROOT / "docs" / name.removeprefix("docs/")).is_file()
    ]
    assert not missing, missing


FEWSHOT = re.compile(r"^python -m pimoe\.bench\.meta_fewshot (--match .*)$", re.MULTILINE)


@pytest.mark.parametrize("line", FEWSHOT.findall((ROOT / "docs" / "adapt.md").read_text()))
def test_fewshot_ablation_commands_match_their_results(line: str) -> None:
    """Each ablation command's ``--match`` selects as many rows as its result file holds, with
    the seeds the file records."""
    from pimoe.bench.meta_fewshot import ablation_rows

    options = dict(zip(*[iter(shlex.split(line))] * 2, strict=True))
    rows = ablation_rows(maml_steps=int(options.get("--maml-steps", 200)))
    chosen = [name for name, _, _ in rows if re.search(options["--match"], name)]
    result = json.loads((ROOT / options["--json"]).read_text())
    assert chosen and len(chosen) == len(result["rows"]), (chosen, result["rows"])
    assert result["seeds"] == [int(s) for s in options["--seeds"].split(",")]


def test_paths_named_in_docs_exist() -> None:
    """Test files, sources, scripts and examples the docs name (a ``-k`` expression of a
    ``python -m pytest FILE -k NAME`` command matches a test of that file)."""
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for path in re.findall(
            r"(?:tests|src/pimoe|benchmarks|examples)/[\w/.-]+\.(?:py|txt)", text
        ):
            if not (ROOT / path).is_file():
                missing.append(f"{doc.name}: {path}")
        for path, name in re.findall(r"python -m pytest (tests/\S+\.py) -k (\w+)", text):
            if not re.search(rf"def test\w*{name}", (ROOT / path).read_text()):
                missing.append(f"{doc.name}: no test matching -k {name} in {path}")
        for path, name in re.findall(r"(tests/[\w/.-]+\.py)::(\w+)", text):
            if f"def {name}(" not in (ROOT / path).read_text():
                missing.append(f"{doc.name}: {path}::{name}")
    assert not missing, missing


# Flags of other tools the docs quote: Flower's flwr, curl, pytest, pip, torchrun.
FOREIGN_FLAGS = {
    "--insecure",
    "--node-config",
    "--stream",
    "--superlink",
    "--cacert",
    "--durations",
    "--no-deps",
    "--max-restarts",
    "--nnodes",
    "--nproc-per-node",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
}


def test_every_flag_in_docs_exists() -> None:
    """Each ``--flag`` written in docs/ is an option of some ``pimoe`` command, of a
    ``python -m pimoe...`` module the docs run, or of another tool the docs quote."""
    import subprocess
    import sys

    known = set(FOREIGN_FLAGS)

    def collect(command: click.Command) -> None:
        for param in command.params:
            known.update(param.opts, param.secondary_opts)
        for sub in getattr(command, "commands", {}).values():
            collect(sub)

    collect(typer.main.get_command(app))
    for script in (ROOT / "benchmarks").glob("*.py"):
        known.update(re.findall(r'add_argument\(\s*"(--[a-z][a-z0-9-]+)"', script.read_text()))
    modules = {m for doc in DOCS for m in re.findall(r"python -m (pimoe[\w.]*)", doc.read_text())}
    for module in sorted(modules):
        usage = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
        ).stdout
        known.update(re.findall(r"--[a-z][a-z0-9-]+", usage))
    unknown = [
        f"{doc.name}: {flag}"
        for doc in DOCS
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", doc.read_text())))
        if flag not in known
    ]
    assert not unknown, unknown


def test_python_c_imports_in_docs_resolve() -> None:
    """Each ``from pimoe... import a, b`` inside a ``python -c`` command of the docs imports."""
    import importlib

    imports = [
        (doc.name, module, name.strip())
        for doc in DOCS
        for snippet in re.findall(r"python -c [\"']([^\"']+)", doc.read_text())
        for module, names in re.findall(r"from (pimoe[\w.]*) import ([\w, ]+)", snippet)
        for name in names.split(",")
    ]
    assert len(imports) >= 5
    for doc, module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"{doc}: {module}.{name}"
