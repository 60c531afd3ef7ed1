"""The install files agree with each other and with the README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def pyproject_requirements() -> dict[str, str]:
    project = pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        requirements += [item for item in items if not item.startswith("rmsae[")]
    parsed = [Requirement(item) for item in requirements]
    return {req.name.lower(): str(req.specifier) for req in parsed}


def environment_pip_entries() -> list[str]:
    for entry in environment()["dependencies"]:
        if isinstance(entry, dict) and "pip" in entry:
            return list(entry["pip"])
    raise AssertionError("environment.yml has no pip section")


def test_environment_matches_pyproject():
    entries = [entry for entry in environment_pip_entries() if not entry.startswith("-e")]
    parsed = {Requirement(entry).name.lower(): str(Requirement(entry).specifier) for entry in entries}
    assert parsed == pyproject_requirements()


def test_environment_installs_package():
    assert "-e .[all]" in environment_pip_entries()


def test_python_versions_agree():
    conda_python = next(e for e in environment()["dependencies"] if isinstance(e, str) and e.startswith("python="))
    version = conda_python.split("=", 1)[1]
    requires = pyproject()["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(version + ".0")


def test_all_extra_covers_extras():
    extras = pyproject()["project"]["optional-dependencies"]
    named = set(re.search(r"\[(.*)\]", extras["all"][0]).group(1).split(","))
    assert named == set(extras) - {"all"}


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    assert "make test" in ci_script
