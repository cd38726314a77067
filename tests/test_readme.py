"""Every Python snippet in the README runs as written, from the project's root, against the
release checkpoint and the bundled example images, so a snippet cannot rot."""

import re
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_shows_how_to_load_and_classify_in_python():
    assert any("pipeline(" in snippet and "from_pretrained(" in snippet for snippet in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_each_readme_python_snippet_runs(index, env, tmp_path):
    code = SNIPPETS[index]
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                            env={**env, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, f"snippet {index}:\n{SNIPPETS[index]}\n{result.stderr[-3000:]}"
