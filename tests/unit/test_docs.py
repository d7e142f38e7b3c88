"""The docs say only what the repository shows: the architecture map names only what exists
(every file in its table, every class, function and method in the table or the request path),
every call the request path draws is in the caller's code, the docs point at nothing outside the
repository, and the ADR index lists every ADR."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    p for folder in ("cluster", "workers", "client", "kvray") for p in (ROOT / folder).glob("*.py")
]


def map_section() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    start = text.index("## Map")
    return text[start : text.index("\n## ", start + 1)]


def defined(name: str, source: str) -> bool:
    return bool(re.search(rf"^\s*(class|def|async def) {name}\b|^\s*{name}\s*[:=]", source, re.M))


def test_every_file_on_the_map_exists():
    folder = ""
    checked = 0
    for line in map_section().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) != 3 or cells[0] in ("where", "---"):
            continue
        folder = re.findall(r"`([\w/]+)/`", cells[0])[0] if cells[0] else folder
        for name in re.findall(r"`([\w/.]+\.(?:py|proto))`", cells[1]):
            assert (ROOT / folder / name).is_file(), f"{folder}/{name}"
            checked += 1
    assert checked >= 40


def test_every_name_on_the_map_exists_in_the_code():
    sources = {p: p.read_text() for p in SOURCES}
    text = map_section()
    names = set(re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", text))
    names |= set(re.findall(r"\b([A-Z]\w+\.\w+)\b", text))  # Class.method in the request path
    checked = 0
    for name in sorted(names):
        if name.endswith((".py", ".proto")) or name.split(".")[0] in ("kvray", "torch"):
            continue  # files and module paths (the file test checks those)
        owner, _, attr = name.partition(".")
        if attr and owner.islower():  # module.function
            files = [src for path, src in sources.items() if path.stem == owner]
        else:
            files = [src for src in sources.values() if defined(owner, src)]
        assert files, f"{owner} is on the map but defined nowhere"
        if attr:
            assert any(defined(attr, src) for src in files), name
        checked += 1
    assert checked >= 40


# ---------------------------------------------------------------------- the request path's calls


def definitions() -> dict[str, list[ast.AST]]:
    """Every function and method of kvray's code, under `Owner.name` (its class, or the function
    it is nested in), and a top-level function also under `name` and `module.name`."""
    found: dict[str, list[ast.AST]] = {}

    scopes = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

    def visit(node: ast.AST, owner: str | None, module: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                top = [child.name, f"{module}.{child.name}"]
                for key in [f"{owner}.{child.name}"] if owner else top:
                    found.setdefault(key, []).append(child)
            visit(child, child.name if isinstance(child, scopes) else owner, module)

    for path in SOURCES:
        visit(ast.parse(path.read_text()), None, path.stem)
    return found


def calls(node: ast.AST, name: str) -> bool:
    """Whether `node`'s code calls something named `name` (`name(...)` or `x.name(...)`)."""
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            func = call.func
            if (isinstance(func, ast.Attribute) and func.attr == name) or (
                isinstance(func, ast.Name) and func.id == name
            ):
                return True
    return False


NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?"


def request_path_calls() -> list[tuple[str, str]]:
    """The `caller → callee` pairs of the request-path diagram. A line is cut at connectors
    (`──X──►`) and at `;`; in each piece that holds `→`, parentheses are comments, `A → B, C`
    means A calls B and C, and `A → B → C` means A calls B and B calls C."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    start = text.index("One request, from the client to its tokens")
    block = text[text.index("```", start) + 3 :]
    block = block[: block.index("```")]
    pairs = []
    for line in block.splitlines():
        for piece in re.split(r"\S*[─►◄┘]\S*|;", line):
            if "→" not in piece:
                continue
            while re.search(r"\([^()]*\)", piece):
                piece = re.sub(r"\([^()]*\)", "", piece)
            segments = [[item.strip(" ()") for item in seg.split(",")] for seg in piece.split("→")]
            for seg in segments:
                for item in seg:
                    assert re.fullmatch(NAME, item), f"not a name in the request path: {item!r}"
            for callers, callees in itertools.pairwise(segments):
                assert len(callers) == 1, f"ambiguous: {', '.join(callers)} → ... in {line!r}"
                pairs += [(callers[0], callee) for callee in callees]
    return pairs


def test_the_request_path_parses_into_calls():
    pairs = request_path_calls()
    assert ("Router.generate", "Router.admit") in pairs
    assert ("http_server._generate", "Router.admit") in pairs
    assert len(pairs) >= 25


def test_each_call_in_the_request_path_is_in_the_callers_code():
    defs = definitions()
    wrong = []
    for caller, callee in request_path_calls():
        missing = [name for name in (caller, callee) if name not in defs]
        method = callee.rpartition(".")[2]
        if missing:
            wrong.append(f"{caller} → {callee}: {', '.join(missing)} defined nowhere")
        elif not any(calls(node, method) for node in defs[caller]):
            wrong.append(f"{caller} → {callee}: {caller} does not call {method}")
    assert not wrong, "the request path in docs/architecture.md:\n" + "\n".join(wrong)


def test_the_check_fails_for_a_call_that_is_not_made():
    defs = definitions()
    assert any(calls(node, "admit") for node in defs["http_server._generate"])
    assert not any(calls(node, "submit") for node in defs["http_server._generate"])


def test_the_http_front_door_calls_what_the_architecture_says():
    text = (ROOT / "docs" / "architecture.md").read_text()
    start = text.index("**One router, two front doors**")
    bullet = re.split(r"\n- |\n\n", text[start:])[0]
    sentence = bullet[bullet.index("A request calls") :].split(", as gRPC's")[0]
    named = set(re.findall(r"`Router\.(\w+)`", sentence))
    assert named >= {"admit", "chunks"}
    tree = ast.parse((ROOT / "cluster" / "http_server.py").read_text())
    for method in named:
        assert calls(tree, method), f"http_server.py never calls Router.{method}"


# ---------------------------------------------------------------------- docs stand alone

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_doc_points_at_nothing_outside_the_repository(path):
    """A clone has only the repository: no planning notes, no issue tracker."""
    text = path.read_text()
    relative = re.findall(r"(?:\.\./)+[\w.-]*", text)  # where "../x" leads, from this doc
    found = [r for r in relative if not (path.parent / r).resolve().is_relative_to(ROOT)]
    found += [s for s in ("ARCHITECTURE.md",) if s in text]  # the planning notes' design doc
    found += re.findall(r"closing notes?|issue #|\bthe issues?\b", text, re.IGNORECASE)
    assert not found, f"{path.relative_to(ROOT)} points outside the repository: {found}"


def test_the_adr_index_lists_every_adr_with_its_title():
    folder = ROOT / "docs" / "adr"
    index = (folder / "README.md").read_text()
    listed = re.findall(r"\]\(([\w.-]+\.md)\)", index)
    files = sorted(p.name for p in folder.glob("*.md") if p.name != "README.md")
    assert sorted(listed) == files
    for name in files:
        title = (folder / name).read_text().splitlines()[0]
        number, _, words = title.removeprefix("# ").partition(" — ")
        row = next(line for line in index.splitlines() if f"]({name})" in line)
        assert name.startswith(number) and number in row, (name, row)
        assert words in row, f"the index's title for {name} is not {words!r}"


def test_the_architecture_links_the_adr_index():
    assert "(adr/README.md)" in (ROOT / "docs" / "architecture.md").read_text()
