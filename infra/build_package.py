"""Build the Lambda code package: the runtime dependencies as wheels for Lambda's platform, plus
the `shared`, `producer` and `consumer` packages, in one zip that serverless.yml deploys
(`package.artifact`).

    .venv/bin/python infra/build_package.py      # or: make package

The dependencies are exactly the runtime's ([project].dependencies, not the test extra) at the
versions and file hashes in uv.lock, the lock that .venv is installed from too, so Lambda runs
what the tests ran (`uv export --locked`, which fails when uv.lock is out of date with
pyproject.toml). Their wheels are chosen for CPython 3.12 on manylinux x86_64 up to glibc 2.34
(Lambda's python3.12 runtime runs on Amazon Linux 2023), whatever machine builds, so compiled
ones such as pydantic-core and cryptography match the runtime; pyproject.toml's
[tool.uv].required-environments makes sure every locked version has such a wheel. boto3 is
packaged too although the runtime has one: the runtime's version changes without notice, and
the code relies on recent botocore (standard retry mode's `total_max_attempts`, SQS message move
tasks).

uv is the one `make` installs (the `UV` variable it exports, as `uv run` does too), else the
version pyproject.toml pins in .tools/, else `uv` on PATH.

Prints the zip's size and file count; if a `python3.12` is on PATH, imports both handlers from
the unpacked package with it, as Lambda will.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "build" / "lambda" / "mail-syncer.zip"
APP_PACKAGES = ("shared", "producer", "consumer")
PYTHON_VERSION = "3.12"
# serverless.yml's provider.architecture is x86_64. Lambda's Amazon Linux 2023 has glibc 2.34;
# uv takes every manylinux wheel up to that (manylinux1 and manylinux2014 included).
PYTHON_PLATFORM = "x86_64-manylinux_2_34"
# Lambda's limit on the unzipped code of a function.
MAX_UNZIPPED_BYTES = 250 * 1024 * 1024
# Every entry gets the same timestamp, so the same inputs give the same zip (and deploys of an
# unchanged package change nothing).
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def find_uv() -> str:
    """The uv to run: `UV` from the environment, else the pinned one in .tools/, else uv on PATH."""
    if os.environ.get("UV"):
        return os.environ["UV"]
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["required-version"]
    pinned = ROOT / ".tools" / f"uv-{required.removeprefix('==')}" / "bin" / "uv"
    if pinned.exists():
        return str(pinned)
    found = shutil.which("uv")
    if found is None:
        sys.exit(f"no uv {required}: run `make package`, which installs it into .tools/")
    return found


def install_dependencies(target: Path, work: Path) -> None:
    """The runtime's locked requirements, with hashes, installed as wheels for Lambda's platform."""
    uv = find_uv()
    requirements = work / "requirements.txt"
    export = [
        uv, "export", "--quiet", "--locked", "--format", "requirements.txt",
        "--no-dev", "--no-emit-project", "--output-file", str(requirements),
    ]  # fmt: skip
    subprocess.run(export, check=True, cwd=ROOT)
    command = [
        uv, "pip", "install", "--quiet", "--target", str(target),
        "--python-platform", PYTHON_PLATFORM, "--python-version", PYTHON_VERSION, "--only-binary", ":all:",
        "--no-deps", "--require-hashes", "--requirements", str(requirements),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)


def copy_app(target: Path) -> None:
    for package in APP_PACKAGES:
        shutil.copytree(
            ROOT / package,
            target / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"),
        )


def package_files(tree: Path) -> list[Path]:
    """Every file but the console scripts (bin/), uv's lock on the folder (.lock) and byte code
    compiled for another Python."""
    files = []
    for path in sorted(tree.rglob("*")):
        relative = path.relative_to(tree)
        if path.is_dir() or relative.parts[0] == "bin" or relative == Path(".lock") or "__pycache__" in relative.parts:
            continue
        if path.suffix in (".pyc", ".pyo"):
            continue
        files.append(relative)
    return files


def write_zip(tree: Path, output: Path) -> tuple[int, int]:
    """Zip the tree into `output` (atomically); returns (file count, unzipped bytes)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    files = package_files(tree)
    unzipped = 0
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for relative in files:
            data = (tree / relative).read_bytes()
            unzipped += len(data)
            info = zipfile.ZipInfo(relative.as_posix(), date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16  # readable by Lambda's user; nothing needs exec
            archive.writestr(info, data)
    # A reader (serverless, a test) sees the old zip or the new one, never half of one.
    os.replace(partial, output)
    return len(files), unzipped


def import_check(tree: Path, python: str | None) -> str:
    """Import both handlers with a CPython 3.12 from the unpacked tree only, as Lambda does."""
    python = python or shutil.which(f"python{PYTHON_VERSION}")
    # A pyenv shim is on PATH even where it cannot run: ask the interpreter itself.
    if python is None or subprocess.run([python, "-c", ""], capture_output=True).returncode != 0:
        return f"import check not run: no working python{PYTHON_VERSION} (give one with --check-python)"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import producer.handler, consumer.handler, pydantic_core, cryptography.hazmat.bindings._rust"
    )
    # -I: no user site-packages and no PYTHON* variables, so only the package can satisfy imports.
    subprocess.run([python, "-I", "-c", code, str(tree)], check=True, cwd=tree)
    return f"import check passed with {python}"


def build(output: Path, check_python: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="mail-syncer-package-") as work_dir:
        work = Path(work_dir)
        tree = work / "package"
        install_dependencies(tree, work)
        copy_app(tree)
        count, unzipped = write_zip(tree, output)
        if unzipped > MAX_UNZIPPED_BYTES:
            sys.exit(f"{output}: {unzipped / 2**20:.1f} MB unzipped, over Lambda's 250 MB limit")
        checked = import_check(tree, check_python)
    zipped = output.stat().st_size
    shown = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    print(f"{shown}: {zipped / 2**20:.1f} MB zipped, {unzipped / 2**20:.1f} MB unzipped, {count} files")
    print(checked)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--check-python", help="a CPython 3.12 to import the handlers with (default: python3.12)")
    args = parser.parse_args(argv)
    build(args.output.resolve(), args.check_python)


if __name__ == "__main__":
    main()
