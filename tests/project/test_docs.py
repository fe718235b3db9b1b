"""The README's quick start runs as written; the docs link only to files that exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_the_quick_start_runs_as_written(tmp_path):
    runnable = [block for page in PAGES for block in python_blocks(page) if block.startswith("import autoq")]
    assert runnable, "the README's quick start is a complete program starting with `import autoq`"
    for block in runnable:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "autoq result:" in done.stdout
    assert (tmp_path / "model.autoq").is_file() and (tmp_path / "deploy" / "run.py").is_file()


def test_links_between_pages_point_at_files_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http") and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
