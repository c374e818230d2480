"""The README documents every job key, command, option and exit code (as sqlite-utils' test_docs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchrun import errors
from batchrun.cli import main
from batchrun.config import JobFile

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def _job_keys() -> list[str]:
    return [
        f"{section}.{key}"
        for section, fld in JobFile.model_fields.items()
        for key in fld.annotation.model_fields
    ]


@pytest.mark.parametrize("dotted", _job_keys())
def test_every_job_key_is_in_the_readme(dotted: str) -> None:
    section, key = dotted.split(".")
    assert f"[{section}]" in README
    assert f"`{key}`" in README, f"job key {dotted} is not documented in README.md"


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_is_in_the_readme(command: str) -> None:
    assert f"batchrun {command}" in README or (command == "run" and "batchrun JOB.toml" in README)


@pytest.mark.parametrize(
    "option",
    sorted({opt for cmd in main.commands.values() for p in cmd.params for opt in p.opts if opt.startswith("--") and opt != "--help"}),
)
def test_every_option_is_in_the_readme(option: str) -> None:
    assert f"`{option}" in README or f" {option}" in README, f"{option} is not documented"


def test_every_exit_code_is_in_the_readme() -> None:
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.BatchrunError)
    } | {0, 3}
    table = set(int(c) for c in re.findall(r"^\| (\d+) \|", README, flags=re.M))
    assert codes <= table, f"undocumented exit codes: {sorted(codes - table)}"
