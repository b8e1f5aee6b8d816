"""Run the test suite on every supported Python: ``nox`` (or ``nox -s tests-3.13``).

With pyenv, make all versions visible first, e.g.
``PYENV_VERSION=3.10.13:3.11.7:3.12.1:3.13.0 nox``.
"""

import nox

nox.options.sessions = ["tests"]


@nox.session(python=["3.10", "3.11", "3.12", "3.13"])
def tests(session: nox.Session) -> None:
    """The README's test command, in a fresh venv per Python version."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff and mypy, as CI runs them."""
    session.install("-e", ".[test]")
    session.run("ruff", "check", "keyedpool", "tests", "bench", "noxfile.py")
    session.run("mypy")
