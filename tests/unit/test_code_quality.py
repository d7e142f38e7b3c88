"""Lint, format and type checks run with the tests, so CI enforces them; and the rules the docs
state about the code, checked over the source files."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout


def test_ruff_format_is_clean():
    result = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout


def test_mypy_is_clean():
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------- rules the docs state

# kvray's code: everything installed as the `kvray` package (tests/ and bench/ are not).
CODE = sorted(
    [
        p
        for folder in ("cluster", "workers", "client", "protos")
        for p in (ROOT / folder).rglob("*.py")
    ]
    + list((ROOT / "kvray").glob("*.py"))  # NOTE: not rglob: kvray/cluster etc. are links
)

# Reads of the environment outside cluster/config.py: other programs' variables only, each
# listed in docs/architecture.md ("Config"). A new read, or one that went away, fails below.
OTHER_PROGRAMS_VARIABLES = {
    ("workers/cpu_kernels.py", "PATH"),  # to put pip's `ninja` where torch looks for it
    ("workers/cpu_kernels.py", "TORCH_EXTENSIONS_DIR"),  # where torch builds the kernels
    ("workers/triton_attention.py", "TRITON_INTERPRET"),  # Triton's CPU interpreter
    ("cluster/launcher.py", "RAY_AUTH_MODE"),  # named in the warning when Ray's auth is off
}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_code_scan_sees_every_package():
    folders = {relative(p).split("/")[0] for p in CODE}
    assert folders == {"cluster", "workers", "client", "protos", "kvray"}
    assert ROOT / "workers" / "device.py" in CODE and ROOT / "kvray" / "wire.py" in CODE


def test_only_device_py_speaks_torch_cuda():
    """docs/architecture.md: `device.py` is the only `torch.cuda` caller; everything else runs
    unchanged on CPU."""
    pattern = re.compile(r"\btorch\.cuda\b|from torch import [^\n]*\bcuda\b")
    offenders = [
        f"{relative(p)}:{n}: {line.strip()}"
        for p in CODE
        if relative(p) != "workers/device.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, "torch.cuda outside workers/device.py:\n" + "\n".join(offenders)
    assert pattern.search((ROOT / "workers" / "device.py").read_text())  # the check can match


def environment_reads(source: str) -> set[str]:
    """The variables a module reads or writes through `os.environ` / `os.getenv`, by name; `*`
    for any other use of the environment (passed on, iterated, a name not spelled out)."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            found |= {"*" for alias in node.names if alias.name in ("environ", "getenv")}
        if not (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in ("environ", "getenv", "environb", "putenv", "unsetenv")
        ):
            continue
        parent = parents[node]
        if isinstance(parent, ast.Subscript) and parent.value is node:
            key = parent.slice  # os.environ["X"]
        elif isinstance(parent, ast.Call) and parent.func is node:
            key = parent.args[0] if parent.args else None  # os.getenv("X")
        elif isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call):
            call = parents[parent]
            key = (
                call.args[0] if call.args and parent.attr in ("get", "pop", "setdefault") else None
            )
        else:
            key = None
        name = key.value if isinstance(key, ast.Constant) else None
        found.add(name if isinstance(name, str) else "*")
    return found


def test_only_the_config_loader_reads_kvray_settings_from_the_environment():
    """docs/architecture.md ("Config"): kvray's own settings are read only by cluster/config.py;
    the only other reads are the listed variables of other programs."""
    reads = {
        (relative(p), name)
        for p in CODE
        if relative(p) != "cluster/config.py"
        for name in environment_reads(p.read_text())
    }
    assert not {r for r in reads if r[1] == "*" or r[1].startswith("KVRAY_")}, reads
    assert reads == OTHER_PROGRAMS_VARIABLES
    assert environment_reads((ROOT / "cluster" / "config.py").read_text()) == {"*"}


def test_the_environment_scan_finds_each_kind_of_read():
    source = (
        "import os\nos.environ['A']\nos.environ.get('B', '')\nos.getenv('C')\n"
        "os.environ['D'] = '1'\nenv = os.environ\nos.environ.get(name)\n"
    )
    assert environment_reads(source) == {"A", "B", "C", "D", "*"}
    assert environment_reads("from os import environ\n") == {"*"}


def test_the_docs_list_every_other_programs_variable_kvray_reads():
    text = (ROOT / "docs" / "architecture.md").read_text()
    start = text.index("kvray's own settings are read only by")
    rule = re.split(r"\n\n|\n- ", text[start:])[0]
    for path, name in OTHER_PROGRAMS_VARIABLES:
        assert f"`{name}`" in rule and f"`{path}`" in rule, (path, name)
