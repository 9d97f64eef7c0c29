"""The project is an installed package with one-way imports: no sys.path edits outside tests, no
import cycle inside `longalign`, imports run down the layers shared -> ops -> modeling -> data ->
train / eval -> demo -> scripts (DESIGN.md §11), and the ChatGLM remote code imports torch and
transformers only."""
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


# ---- layers: shared -> ops -> modeling -> data -> train / eval -> demo -> scripts ----------------
# A module may import its own layer or a lower one; train and eval never import each other.
SHARED = {"longalign", "longalign.constants", "longalign.storage", "longalign.fault_points", "longalign.pack_geometry",
          "longalign.json_files", "longalign.remote_code", "longalign.arguments"}
LAYERS = {"shared": 0, "ops": 1, "modeling": 2, "data": 3, "train": 4, "eval": 4, "demo": 5}
SCRIPTS = {"train", "pre_tokenize", "sort_and_group", "LongBench_Chat", "Needle_test", "bench",
           "modeling_chatglm", "modeling_llama", "llama_flash_attn_monkey_patch"}


def layer_of(module: str) -> str:
    if module in SHARED:
        return "shared"
    part = module.split(".")[1]
    if part not in LAYERS:
        raise AssertionError(f"{module}: not in a stage subpackage nor listed as shared (test_package_layout.SHARED)")
    return part


def _package_edges():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = []
    for name, path in modules.items():
        for imported in _imports(path):
            if imported.split(".")[0] in SCRIPTS:
                edges.append((name, imported))
                continue
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                edges.append((name, imported))
    return modules, edges


def back_edges(edges) -> list[str]:
    bad = []
    for source, target in edges:
        if target.split(".")[0] in SCRIPTS:
            bad.append(f"{source} -> {target} (a script)")
            continue
        s, t = layer_of(source), layer_of(target)
        if LAYERS[t] > LAYERS[s] or (LAYERS[t] == LAYERS[s] and s != t):
            bad.append(f"{source} ({s}) -> {target} ({t})")
    return bad


def test_every_module_has_a_layer():
    modules, _ = _package_edges()
    for name in modules:
        layer_of(name)


def test_imports_run_down_the_layers():
    _, edges = _package_edges()
    assert back_edges(edges) == []


def test_a_back_edge_is_caught():
    assert back_edges([("longalign.ops.varlen_attention", "longalign.train.trainer")]) != []
    assert back_edges([("longalign.eval.judge", "longalign.train.collators")]) != []
    assert back_edges([("longalign.data.packing", "train")]) != []
    assert back_edges([("longalign.train.trainer", "longalign.data.validation"),
                       ("longalign.modeling.loading", "longalign.remote_code")]) == []
