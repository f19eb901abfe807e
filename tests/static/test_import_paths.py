"""Imports resolve through packages and configured paths, never through code that edits ``sys.path``.

Lambda puts the layers on ``/opt/python``; the images set ``PYTHONPATH`` in their Dockerfiles; the development venv
has a ``.pth`` (Makefile); pytest has ``pythonpath`` (pyproject.toml). Local mode reproduces Lambda's layer path on
purpose (localmode/lambdas.py, localmode/cloud.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYS_PATH_EDIT = re.compile(r"\bsys\.path\.(insert|append|extend)\(|\bsys\.path\s*(\+=|=[^=])")
# Local mode imports each handler from its own code directory with the layers beside it, as Lambda does.
REPRODUCES_LAMBDA = {"localmode/lambdas.py", "localmode/cloud.py"}
# Still to change (issue 17): each must stop editing sys.path, and then leave this list (a test checks).
PENDING: set[str] = set()
IMAGES = {
    "training_image/Dockerfile": "python /opt/program/training_image/train.py",
    "inference_image/Dockerfile": "python -m inference_image.serve",
}


def _python_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if (REPO / f).is_file()]


def _edits_sys_path(path: str) -> bool:
    code = "\n".join(line.split("#", 1)[0] for line in (REPO / path).read_text().splitlines())
    return SYS_PATH_EDIT.search(code) is not None


def test_no_code_edits_sys_path() -> None:
    this = str(Path(__file__).resolve().relative_to(REPO))  # its examples below
    editing = {f for f in _python_files() if f != this and _edits_sys_path(f)}
    assert editing - REPRODUCES_LAMBDA - PENDING == set()


def test_the_pending_list_holds_only_files_that_still_edit_sys_path() -> None:
    fixed = {f for f in PENDING if not (REPO / f).is_file() or not _edits_sys_path(f)}
    assert fixed == set(), "remove these from PENDING: they no longer edit sys.path"


def test_the_check_sees_an_edit() -> None:
    assert SYS_PATH_EDIT.search("sys.path.insert(0, str(ROOT))")
    assert SYS_PATH_EDIT.search("    sys.path.append(p)")
    assert SYS_PATH_EDIT.search("sys.path = [*extra, *sys.path]")
    assert not SYS_PATH_EDIT.search("if p not in sys.path:")
    assert not SYS_PATH_EDIT.search("print(sys.path == before)")


def image_path_findings(text: str, entry_point: str) -> list[str]:
    """What keeps a Dockerfile's entry point from importing as it does in the repository: the code under
    /opt/program (the WORKDIR) and PYTHONPATH naming that root and every layer the image copies."""
    findings = []
    found = re.findall(r"^ENV\s.*?\bPYTHONPATH=(\S+)", text.replace("\\\n", " "), flags=re.MULTILINE)
    path = found[0].split(":") if len(found) == 1 else []
    if not path or path[0] != "/opt/program":
        findings.append("PYTHONPATH does not start with /opt/program")
    if "WORKDIR /opt/program" not in text.splitlines():
        findings.append("WORKDIR is not /opt/program")
    layers = re.findall(r"^COPY layers/(\w+)/\w+ /opt/program/layers/\1/\w+$", text, flags=re.MULTILINE)
    findings += [f"layers/{name} is copied but not on PYTHONPATH" for name in layers
                 if f"/opt/program/layers/{name}" not in path]
    entry = re.findall(r"^ENTRYPOINT (\[.*\])$", text, flags=re.MULTILINE)
    if not entry or " ".join(json.loads(entry[-1])) != entry_point:
        findings.append(f"ENTRYPOINT is not {entry_point}")
    return findings


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_images_put_the_repository_and_each_copied_layer_on_pythonpath(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    assert re.search(r"^COPY layers/", text, flags=re.MULTILINE), f"{dockerfile} copies no layer"
    assert image_path_findings(text, IMAGES[dockerfile]) == []


def test_a_layer_missing_from_pythonpath_is_caught() -> None:
    text = (REPO / "inference_image/Dockerfile").read_text()
    broken = text.replace(":/opt/program/layers/imaging", "", 1)
    assert broken != text
    assert image_path_findings(broken, IMAGES["inference_image/Dockerfile"]) == [
        "layers/imaging is copied but not on PYTHONPATH"]
    assert image_path_findings(text, "python /opt/program/inference_image/serve.py") == [
        "ENTRYPOINT is not python /opt/program/inference_image/serve.py"]
