"""The project is an installed package with one-way imports: no sys.path edits outside tests, no
import cycle inside `longalign`, and the ChatGLM remote code imports torch and transformers only."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "longalign"
REMOTE_CODE = ("configuration_chatglm.py", "modeling_chatglm.py")


def _python_files():
    skip = {".venv", "tests", ".git"}
    return [p for p in REPO.rglob("*.py") if not (set(p.relative_to(REPO).parts) & skip)
            and not p.relative_to(REPO).parts[0].startswith(".venv")]


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_sys_path_edits_outside_tests():
    offenders = [str(p.relative_to(REPO)) for p in _python_files() if "sys.path.insert" in p.read_text(encoding="utf-8")
                 or "sys.path.append" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_package_imports_have_no_cycle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # `from longalign.x import y` names module x
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_remote_code_is_self_contained():
    for name in REMOTE_CODE:
        path = PACKAGE / "modeling" / name
        tops = {imported.split(".")[0] for imported in _imports(path)}
        assert tops <= {"torch", "transformers", "__future__", "math", "typing"}, (name, tops)
        relative = [n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
        assert set(relative) <= {"configuration_chatglm"}, (name, relative)
