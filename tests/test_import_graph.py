"""The dependency direction of DESIGN.md section 2, checked on the source's import statements."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOW_LEVEL = ["cache", "attention", "layers", "parallel", "sample", "sched"]
FORBIDDEN_FOR_LOW = ("blocks.engine", "blocks.models", "serve")
SERVER_ONLY = ("fastapi", "uvicorn", "pydantic", "prometheus_client", "openai", "starlette")


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _files(package: str):
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


@pytest.mark.parametrize("block", LOW_LEVEL)
def test_low_level_blocks_do_not_import_engine_models_or_serve(block):
    for path in _files(f"blocks.{block}"):
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN_FOR_LOW), f"{path.relative_to(ROOT)} imports {name}"


def test_models_import_only_lower_blocks():
    for path in _files("blocks.models"):
        for name in _imports(path):
            assert not name.startswith(("blocks.engine", "serve")), f"{path.relative_to(ROOT)} imports {name}"


def test_blocks_package_never_imports_server_only_packages():
    for path in _files("blocks"):
        for name in _imports(path):
            assert name.split(".")[0] not in SERVER_ONLY, f"{path.relative_to(ROOT)} imports {name}"


def test_serve_uses_only_the_engine_public_api():
    for path in _files("serve"):
        for name in _imports(path):
            if name.startswith("blocks."):
                allowed = ("blocks.engine", "blocks.sample.params", "blocks.sched.errors")
                assert name.startswith(allowed) or name == "blocks", f"{path.relative_to(ROOT)} imports {name}"


def test_import_graph_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from blocks.engine import core\nimport fastapi\n")
    assert "blocks.engine" in _imports(bad) and "fastapi" in _imports(bad)
