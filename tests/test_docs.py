"""The documentation site (mkdocs.yml, docs/): it builds with `mkdocs build --strict`, and every command of
the Quick start is run, either here or by .ci/run (which CI runs on a fresh machine).

How a Quick start command is covered, in order:
- it is a command of .ci/run (quiet flags aside: `pip install -q ...` is `pip install ...`);
- or RUN_HERE below runs it (the exact text, in bash) and checks what it should do.
A command that is neither fails `test_quick_start_command_is_run`, naming where to add it.

`swiftserve serve` is the one command run here only in part (`--help`: it parses, and its default is the
packaged local config): serving takes 30 s to ready and 1.5 min on a first start, over this file's budget.
tests/test_first_hour_served.py serves configs/local.yaml that way (one replica, its own ports) and asks it
the Quick start's question through the openai client and through `swiftserve chat --url`;
tests/test_operability.py runs `swiftserve serve` from a built wheel against a real Redis.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
QUICKSTART = DOCS / "quickstart.md"
CI_RUN = ROOT / ".ci" / "run"
BIN = Path(sys.executable).parent  # the environment running the tests: its swiftserve, mkdocs, python
QUIET = {"-q", "-qq", "--quiet"}


def bash_commands(markdown: Path) -> list[str]:
    """The commands of a page's ```bash blocks: one a line, trailing comments and blank lines dropped."""
    commands, inside = [], False
    for line in markdown.read_text().splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            inside = not inside and fence[3:].strip() == "bash"
            continue
        if inside:
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def normalized(command: str) -> str:
    return " ".join(word for word in shlex.split(command) if word not in QUIET)


def ci_commands() -> set[str]:
    lines = [line.strip() for line in CI_RUN.read_text().replace("\\\n", " ").splitlines()]
    return {normalized(line) for line in lines if line and not line.startswith("#")}


def sh(command: str, cwd: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


# ---- the Quick start commands this file runs itself ------------------------------------------
def run_venv(command: str, tmp_path: Path) -> None:
    """Makes .venv in an empty folder and activates it (in a throw-away folder, not the checkout)."""
    out = sh(f'{command} && test "$VIRTUAL_ENV" = "$PWD/.venv" && command -v python', tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / ".venv" / "bin" / "python"), out.stdout


def run_redis_check(command: str, tmp_path: Path) -> None:
    """With redis-server installed (the tests need it), the line finds it and installs nothing."""
    assert shutil.which("redis-server"), "redis-server is not installed: this line would run sudo apt-get"
    out = sh(command, tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("redis-server"), (out.stdout, out.stderr)


def run_serve(command: str, tmp_path: Path) -> None:
    """The command parses, and serves the packaged local default config unless told otherwise."""
    out = sh(f"COLUMNS=1000 {command} --help", tmp_path)  # COLUMNS: no line break inside the path
    assert out.returncode == 0, out.stderr
    default = re.search(r"\(default: (\S+local\.yaml)\)", out.stdout)
    assert default and Path(default[1]).is_file(), out.stdout


def run_chat_url(command: str, tmp_path: Path) -> None:
    """The exact command, stdin closed: against a server on that port it starts and Ctrl-D (EOF) quits with
    status 0; with nothing (or something else) there it fails with one line saying what is wrong."""
    out = sh(command, tmp_path, timeout=90, stdin=subprocess.DEVNULL)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 0 or (out.returncode == 1 and len(lines) == 1), (out.returncode, out.stderr)


RUN_HERE = {
    "python3 -m venv .venv && . .venv/bin/activate": run_venv,
    "command -v redis-server || sudo apt-get install -y redis-server": run_redis_check,
    "swiftserve serve": run_serve,
    "swiftserve chat --url http://127.0.0.1:8000": run_chat_url,
}


# ---- tests -----------------------------------------------------------------------------------
def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: every page in the nav, every link and anchor resolves, no warning."""
    out = sh(f"{shlex.quote(str(BIN / 'python'))} -m mkdocs build --strict --site-dir {shlex.quote(str(tmp_path))}",
             ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "quickstart" / "index.html").is_file()


@pytest.mark.parametrize("command", bash_commands(QUICKSTART), ids=lambda c: c.split(" &&")[0][:40])
def test_quick_start_command_is_run(command, tmp_path):
    if normalized(command) in ci_commands():
        return  # .ci/run runs it
    run = RUN_HERE.get(command)
    assert run, (f"the Quick start command {command!r} is run neither by .ci/run nor by this test: add it to "
                 f".ci/run, or to RUN_HERE in {Path(__file__).name} with a check of what it does")
    run(command, tmp_path)


def test_quick_start_covers_set_up_run_and_test():
    commands = bash_commands(QUICKSTART)
    assert any("pip install" in c for c in commands) and "swiftserve serve" in commands
    assert "python -m pytest -q" in commands and normalized("python -m pytest -q") in ci_commands()


def test_readme_commands_are_the_quick_starts():
    """The front page and the Quick start cannot drift apart: the README's set-up, run and test commands
    are the Quick start's (mkdocs aside: the site build is run above)."""
    quick = set(bash_commands(QUICKSTART))
    readme = [c for c in bash_commands(ROOT / "README.md") if not c.startswith("mkdocs ")]
    assert readme and set(readme) <= quick, set(readme) - quick


def test_documentation_points_at_nothing_outside_the_repository():
    outside = ("../" + "shared", "/work/" + "shared", "shared " + "folder")
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", CI_RUN, *DOCS.glob("*.md"),
             *(p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name)]
    found = [f"{p.relative_to(ROOT)}: {needle}" for p in files for needle in outside if needle in p.read_text()]
    assert not found, found
