"""The package's import graph: no module imports another that imports it back, at any depth.

Function-level imports count too: they hide a cycle from Python's start-up but not from a
reader, and each one was added to dodge a cycle that a better layout removes.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'idm_jax'


def module_name(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> str:
  parts = path.relative_to(package.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def resolve(name: str, modules: set[str]) -> str | None:
  """The idm_jax module that `name` (a module or an attribute of one) lives in."""
  while name and name not in modules:
    name = name.rpartition('.')[0]
  return name or None


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  """module -> the idm_jax modules it imports anywhere in its body (package __init__s, which
  import nothing here, are left out)."""
  files = {module_name(p, package): p for p in package.rglob('*.py')}
  modules = set(files)
  graph = {}
  for mod, path in files.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # relative: resolve against this module's package
          pkg = mod.split('.')[: len(mod.split('.')) - node.level + (path.name == '__init__.py')]
          base = '.'.join(pkg + ([base] if base else []))
        targets = [f'{base}.{a.name}' for a in node.names] + [base]
      for t in targets:
        if t.split('.')[0] == package.name:
          dep = resolve(t, modules)
          if dep and dep != mod and not files[dep].name == '__init__.py':
            deps.add(dep)
    graph[mod] = deps
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component with more than one module (Tarjan)."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return cycles


def test_cycle_finder_finds_a_function_level_cycle(tmp_path):
  pkg = tmp_path / 'idm_jax'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from idm_jax.sub import b\n')
  (pkg / 'sub' / 'b.py').write_text('def f():\n  from idm_jax import c\n')
  (pkg / 'c.py').write_text('import idm_jax.a as a\nimport numpy\n')
  (pkg / 'd.py').write_text('from idm_jax.a import something\n')
  graph = import_graph(pkg)
  assert graph['idm_jax.d'] == {'idm_jax.a'}
  assert find_cycles(graph) == [['idm_jax.a', 'idm_jax.c', 'idm_jax.sub.b']]


def test_no_import_cycles_in_the_package():
  cycles = find_cycles(import_graph())
  assert not cycles, 'import cycles (each a group of modules that import each other): ' + '; '.join(
    ' <-> '.join(c) for c in cycles
  )


@pytest.mark.parametrize(
  'floor',
  ['idm_jax.diffusion', 'idm_jax.models', 'idm_jax.runtime.parallel', 'idm_jax.storage.files'],
)
def test_the_ground_floor_imports_nothing_above_it(floor):
  """The pure libraries (DESIGN.md's ground floor) depend only on each other."""
  ground = (
    'idm_jax.diffusion',
    'idm_jax.models',
    'idm_jax.runtime.parallel',
    'idm_jax.storage.files',
    'idm_jax.runtime.tree_shapes',
  )
  graph = import_graph()
  for mod, deps in graph.items():
    if mod == floor or mod.startswith(floor + '.'):
      above = [d for d in deps if not d.startswith(ground)]
      assert not above, f'{mod} imports {above}'


# The folders' floors, bottom up (docs/DESIGN.md, "Layout"): a package imports only from its own
# floor's packages and from those below. The top-level modules are the commands.
FLOORS = (
  ('storage', 'models', 'diffusion'),
  ('runtime',),
  ('data', 'metrics'),
  ('training',),
  ('inference',),
  ('extrinsic', 'aot'),
  ('score', 'restore', 'app', 'main'),
)


def package_of(module: str) -> str:
  return module.split('.')[1]


def test_every_package_has_a_floor():
  packages = {package_of(m) for m in import_graph() if m != 'idm_jax'}
  assert packages == {p for floor in FLOORS for p in floor}


def test_packages_import_only_their_floor_and_below():
  floor_of = {p: i for i, floor in enumerate(FLOORS) for p in floor}
  upward = sorted(
    f'{m} -> {d}'
    for m, deps in import_graph().items()
    for d in deps
    if floor_of[package_of(d)] > floor_of[package_of(m)]
  )
  assert not upward, 'imports from a higher floor: ' + '; '.join(upward)


def test_packages_of_one_floor_do_not_import_each_other_both_ways():
  pairs = {
    (package_of(m), package_of(d))
    for m, deps in import_graph().items()
    for d in deps
    if package_of(m) != package_of(d)
  }
  assert not [(a, b) for a, b in pairs if (b, a) in pairs and a < b]
