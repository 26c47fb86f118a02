"""Every number on docs/RESULTS.md's first screen is in the file its bullet cites.

The citation format: the first screen is the section "## Where things stand". Each bullet (a line
starting "- ", with its indented continuation lines) or paragraph is one claim; its files are the
markdown links into results/ (relative to docs/, so they point under docs/results/). Each figure
of a claim, a number with a decimal point outside link targets and `code`, must be found in one
of that claim's files: some number there that rounds to it at the figure's precision (the file
may hold more digits; the sign must agree; − and - are the same). A claim with figures must cite
a file. A claim whose data is gone says so ("no file: prose only, data lost") and gives no figure
of its own.
"""

import re

from conftest import REPO
import pytest

DOCS = REPO / 'docs'
RESULTS = DOCS / 'RESULTS.md'
SECTION = '## Where things stand'
_NUMBER = r'[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?'


def first_screen(text: str) -> str:
  start = text.index(SECTION)
  end = text.find('\n## ', start + len(SECTION))
  return text[start + len(SECTION) : end if end >= 0 else len(text)]


def claims(section: str) -> list[str]:
  """Bullets (with their continuation lines) and paragraphs of the section."""
  blocks, current = [], []
  for line in section.splitlines():
    if not line.strip() or line.startswith('- '):
      if current:
        blocks.append('\n'.join(current))
      current = [line] if line.strip() else []
    else:
      current.append(line)
  if current:
    blocks.append('\n'.join(current))
  return blocks


def cited_files(claim: str) -> list[str]:
  return re.findall(r'\]\((results/[^)#\s]+)\)', claim)


def figures(claim: str) -> list[str]:
  prose = re.sub(r'\]\([^)]*\)', ']', claim)  # link targets
  prose = re.sub(r'`[^`]*`', '', prose)  # code, commands, paths
  prose = prose.replace('−', '-')
  return re.findall(r'(?<![\w.])[-+]?\d+\.\d+(?![\w.]*\d)', prose)


def found_in(figure: str, text: str) -> bool:
  value = float(figure)
  decimals = len(figure.split('.')[1])
  half = 0.5 * 10**-decimals + 1e-9
  for number in re.findall(_NUMBER, text.replace('−', '-')):
    try:
      x = float(number)
    except ValueError:
      continue
    if abs(x - value) <= half and (x == 0 or value == 0 or (x > 0) == (value > 0)):
      return True
  return False


def untraced(markdown: str, docs_dir) -> list[str]:
  """Every problem of the first screen: figures not in their files, missing files."""
  problems = []
  for claim in claims(first_screen(markdown)):
    files = cited_files(claim)
    figs = figures(claim)
    head = ' '.join(claim.split())[:70]
    if figs and not files:
      problems.append(f'{head!r}: figures {figs} but no results/ file cited')
      continue
    texts = []
    for f in files:
      path = docs_dir / f
      if not path.is_file():
        problems.append(f'{head!r}: cites {f}, which does not exist')
        continue
      texts.append(path.read_text(errors='replace'))
    for fig in figs:
      if not any(found_in(fig, t) for t in texts):
        problems.append(f'{head!r}: {fig} is in none of {files}')
  return problems


def test_every_headline_figure_is_in_the_file_it_cites():
  assert untraced(RESULTS.read_text(), DOCS) == []


def test_the_first_screen_has_claims_with_figures_and_files():
  blocks = claims(first_screen(RESULTS.read_text()))
  traced = [b for b in blocks if figures(b) and cited_files(b)]
  assert len(traced) >= 5
  # The claims about the paper lead with the protocol's results (test faces, five seeds).
  assert any(f.startswith('results/protocol/') for f in cited_files(traced[0]))


def test_the_check_fails_on_a_wrong_figure_a_missing_file_or_no_file(tmp_path):
  (tmp_path / 'results').mkdir()
  (tmp_path / 'results' / 's.md').write_text('| x | **+0.1336 [-0.1599, +0.4271]** | 38.567 |\n')
  good = (
    '# R\n\n## Where things stand\n\n- A gap of +0.134 dB [−0.160, +0.43] and 38.6 dB\n'
    '  ([summary](results/s.md)), `--config.x=0.25` in code is not a figure.\n\n## Next\n'
    '- +9.99 outside the section is not checked\n'
  )
  assert untraced(good, tmp_path) == []
  assert untraced(good.replace('+0.134', '+0.135'), tmp_path)  # a wrong figure
  assert untraced(good.replace('−0.160', '+0.160'), tmp_path)  # the wrong sign
  assert untraced(good.replace('38.6 dB', '38.57 dB'), tmp_path) == []  # more digits, in the file
  assert untraced(good.replace('results/s.md', 'results/t.md'), tmp_path)  # a missing file
  assert untraced(good.replace('([summary](results/s.md))', ''), tmp_path)  # no file cited
  lost = '## Where things stand\n\n- 128 px (no file: prose only, data lost): 19.21 dB.\n'
  assert untraced(lost, tmp_path)


@pytest.mark.parametrize(
  'figure,text,ok',
  [
    ('0.99', '0.9948', True),
    ('0.99', '0.9851', True),
    ('0.99', '0.9849', False),
    ('-0.0007', '-0.0007', True),
    ('-0.0007', '0.0007', False),
    ('4.0', '4', True),
    ('0.6133', '0.6132875952034058', True),
  ],
)
def test_rounding_rule(figure, text, ok):
  assert found_in(figure, text) is ok
