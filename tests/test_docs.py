"""The repository stands alone: no file a user gets points at the method's notes outside it; the
specification it cites is docs/method.md, and its sections exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = ("*.py", "*.md", "*.toml", "*.sh", "*.yaml", "*.sbatch", "run")
SKIP = {".git", ".venv", "runs", ".whl", "__pycache__"}


def _files():
  for pattern in TEXT:
    for path in ROOT.rglob(pattern):
      if path.is_file() and not SKIP & set(path.relative_to(ROOT).parts):
        yield path


def test_nothing_points_outside_the_repository():
  outside = re.compile(r"\.\./shared|TIDAR\.md")
  this = pathlib.Path(__file__).resolve()
  hits = [f"{p.relative_to(ROOT)}:{i}" for p in _files() if p.resolve() != this
          for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
  assert hits == []


def test_cited_method_sections_exist():
  method = (ROOT / "docs" / "method.md").read_text()
  sections = set(re.findall(r"^## (\d+)\.", method, re.M))
  cited = {m for p in _files() for m in re.findall(r"docs/method\.md §(\d+)", p.read_text(errors="replace"))}
  assert cited and cited <= sections, (cited, sections)
