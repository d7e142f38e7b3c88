"""Regenerate the Python code for kvray's protos: `python protos/generate.py [--check]`.

The generated files are committed (so installing kvray needs no protoc); `--check` regenerates
into a temporary folder and fails if the committed files differ (CI runs it as a test).
Imports in the generated gRPC module are made package-relative, since the protos are installed
as `kvray.protos.kvray.v1`.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = sorted((ROOT / "kvray" / "v1").glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT)) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = []
    for proto in PROTOS:
        for suffix in SUFFIXES:
            path = out_dir / "kvray" / "v1" / f"{proto.stem}{suffix}"
            text = re.sub(
                r"^from kvray\.v1 import ", "from . import ", path.read_text(), flags=re.M
            )
            path.write_text(text)
            files.append(path)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for path in generate(Path(tmp)):
            target = ROOT / path.relative_to(tmp)
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(str(target.relative_to(ROOT.parent)))
            else:
                shutil.copyfile(path, target)
    if stale:
        print("stale generated code (run python protos/generate.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
