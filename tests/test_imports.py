"""No import cycle inside tidar_jax: the graph of every `import` statement between its modules
(function-level imports included, so a lazy import cannot hide one) is acyclic."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """{module: modules of the same package it imports}, from the source alone."""
  top = package_dir.parent
  modules = {}
  for path in package_dir.rglob("*.py"):
    name = ".".join(path.relative_to(top).with_suffix("").parts)
    modules[name.removesuffix(".__init__")] = path
  graph = {m: set() for m in modules}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        graph[name] |= {a.name for a in node.names if a.name in modules}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        for a in node.names:
          target = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
          if target in modules and target != name:
            graph[name].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  found, state = [], {}

  def visit(u: str, stack: list[str]) -> None:
    state[u] = "open"
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == "open":
        found.append(stack[stack.index(v):] + [v])
      elif v not in state:
        visit(v, stack)
    stack.pop()
    state[u] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  return found


def test_tidar_jax_has_no_import_cycle():
  graph = import_graph(ROOT / "tidar_jax")
  assert "tidar_jax.train_step" in graph["tidar_jax.dry_run"]  # the graph sees real edges
  assert cycles(graph) == []


def test_a_lazy_cycle_is_found(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from . import a\n  return a\n")
  assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.a"]]
