"""tests/run.sh builds the second (several GB) torch environment only where it tests something new; the
package metadata names the Python the code needs."""

import tomllib
from pathlib import Path

from newest_torch_needed import decide

REPO = Path(__file__).resolve().parent.parent

AVAILABLE = ["3.0.0", "2.13.0", "2.12.1", "2.14.0rc1", "2.6.0"]


def test_the_newest_torch_environment_is_built_only_when_it_tests_another_torch():
    assert decide("2.13.0+cpu", AVAILABLE, ci=False)[0] is False  # a newcomer's install: already the newest
    needed, why = decide("2.11.0", AVAILABLE, ci=False)
    assert needed and "older than 2.13.0" in why and "several GB" in why  # says what it costs first
    assert decide("2.13.0", AVAILABLE, ci=True)[0] is True  # CI keeps testing the newest
    assert decide("2.11.0", [], ci=False)[0] is False  # offline: skipped, said so


def test_requires_python_is_the_version_the_code_needs():
    """The code uses 3.11's sys.exception() and hashlib.file_digest: pip must refuse an older Python, and ruff
    checks for the same version."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
