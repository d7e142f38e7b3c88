"""The architecture map names only what exists: every file in its table, and every class,
function and method named in the table or the request path."""

from __future__ import annotations

import re
from pathlib import Path

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
