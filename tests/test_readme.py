"""The README's examples run as written, and the embedding example type-checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_embedding_example_runs() -> None:
    text = README.read_text()
    match = re.search(r"## Embedding in a Trio app\s+```python\n(.*?)```", text, re.S)
    assert match, "the README lost its embedding example"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "b {'text': 'hello'}" in result.stdout


def test_readme_embedding_example_type_checks_strictly(tmp_path: Path) -> None:
    """The package is typed (``py.typed``): a user's ``mypy --strict`` checks against it."""
    match = re.search(r"## Embedding in a Trio app\s+```python\n(.*?)```", README.read_text(), re.S)
    assert match, "the README lost its embedding example"
    example = tmp_path / "example.py"
    example.write_text(match.group(1))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=README.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_says_it_is_typed() -> None:
    package = README.parent / "trio_replica"
    assert (package / "py.typed").is_file()
    assert 'trio_replica = ["py.typed"]' in (README.parent / "pyproject.toml").read_text()


def test_readme_builtins_tour_runs() -> None:
    text = README.read_text()
    match = re.search(
        r"## Leader election, sharded placement, durable reminders.*?```python\n(.*?)```",
        text,
        re.S,
    )
    assert match, "the README lost its built-ins tour"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("user:42 lives on ")
    assert lines[1] == "the old leader's write was refused"
    assert lines[2] == "fired invoice:7 {'user': 42}"


def test_readme_testing_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    match = re.search(r"## Testing your app.*?```python\n(.*?)```", text, re.S)
    assert match, "the README lost its testing example"
    (tmp_path / "test_example.py").write_text(match.group(1))
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


PACKAGE = README.parent / "PACKAGE.md"


def test_the_index_page_example_runs_and_its_links_are_absolute() -> None:
    """Issue 21: the README's pictures and ./dev commands are relative to a checkout, so the
    package index shows the short PACKAGE.md instead; it must hold nothing relative."""
    assert 'readme = "PACKAGE.md"' in (README.parent / "pyproject.toml").read_text()
    text = PACKAGE.read_text()
    links = re.findall(r"\]\(([^)]*)\)", text)
    assert links and all(link.startswith("https://") for link in links), links
    assert "./dev" not in text
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "PACKAGE.md lost its example"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "{'age': 30}" in result.stdout
