"""docs/DESIGN.md stays true to the tree: its layout names every package and module of idm_jax,
and every module or path it names exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'DESIGN.md'
PACKAGE = ROOT / 'idm_jax'


def layout_block() -> str:
  text = DOC.read_text()
  return re.search(r'^## Layout\n```\n(.*?)^```', text, re.M | re.S).group(1)


def modules() -> list[pathlib.Path]:
  return sorted(p for p in PACKAGE.rglob('*.py') if p.name not in ('__init__.py', '__main__.py'))


def test_the_layout_names_every_package_and_module():
  block = layout_block()
  named = set(re.findall(r'\b(\w+)\.py\b', block))
  packages = sorted(p.name for p in PACKAGE.iterdir() if (p / '__init__.py').exists())
  assert not [p for p in packages if not re.search(rf'^\s+{p}/', block, re.M)]
  assert not [str(m.relative_to(ROOT)) for m in modules() if m.stem not in named]


def test_every_module_the_layout_names_exists():
  stems = {m.stem for m in modules()}
  block = layout_block()
  inside = block.split('\nconfigs/')[0]  # below that line: configs/, launch/, ...
  assert not sorted(set(re.findall(r'\b(\w+)\.py\b', inside)) - stems)


def test_every_path_the_page_names_exists():
  text = DOC.read_text()
  paths = set(
    re.findall(r'\b((?:idm_jax|tests|docs|launch|configs|bench|experiments)/[\w/.]+\.\w+)', text)
  )
  assert paths and not sorted(p for p in paths if not (ROOT / p).exists())
