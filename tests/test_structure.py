"""The codebase stays a reference implementation: scripts import modules, never each other; no
two modules import each other; run_train.py reads in one sitting; no function needs more than
a screen; the README and the docs stay short and say what was measured, not when."""

import ast
import re

import pytest

from tests.conftest import PROJECT_ROOT

SOURCES = sorted(PROJECT_ROOT.glob("*.py"))
NAMES = {path.stem for path in SOURCES}


def parse(path):
    return ast.parse(path.read_text(), filename=str(path))


def is_script(tree) -> bool:
    """A file with an `if __name__ == "__main__":` block is a command, not a module."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def project_imports(tree) -> set[str]:
    """The project's modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & NAMES


GRAPH = {path.stem: project_imports(parse(path)) - {path.stem} for path in SOURCES}
SCRIPTS = {path.stem for path in SOURCES if is_script(parse(path))}


def test_the_commands_are_the_ones_the_readme_names_and_no_script_imports_another():
    assert SCRIPTS == {"run_train", "run_eval", "visualize", "benchmark", "app", "plot_curves"}
    offenders = {name: GRAPH[name] & SCRIPTS for name in GRAPH if GRAPH[name] & SCRIPTS}
    assert not offenders, offenders


def test_no_modules_import_each_other_even_through_others():
    def reaches(start, goal, seen=()):
        return any(step == goal or (step not in seen and reaches(step, goal, (*seen, step))) for step in GRAPH[start])

    cycles = sorted(name for name in GRAPH if reaches(name, name))
    assert not cycles, cycles


def test_the_model_files_import_nothing_of_the_project_but_each_other():
    """They are copied into every saved folder and run under trust_remote_code."""
    assert GRAPH["configuration_hybrid_vit"] == set()
    assert GRAPH["modeling_hybrid_vit"] == {"configuration_hybrid_vit"}


def test_run_train_reads_in_one_sitting_in_numbered_stages():
    source = (PROJECT_ROOT / "run_train.py").read_text()
    assert len(source.splitlines()) <= 500
    stages = re.findall(r"^    # (\d)\. ", source, flags=re.M)
    assert stages == [str(i) for i in range(1, 9)], stages


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.name)
def test_no_function_is_longer_than_sixty_lines(path):
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(parse(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_the_readme_is_short_and_the_docs_are_results_not_a_diary():
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) <= 150
    docs = sorted((PROJECT_ROOT / "docs").rglob("*.md"))
    assert docs and sum(len(path.read_text().splitlines()) for path in docs) <= 1000
    diary = re.compile(r"\b(sessions?|(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth) day)\b", re.I)
    for path in [PROJECT_ROOT / "README.md", *docs, *SOURCES, *sorted((PROJECT_ROOT / "configs").rglob("*.yaml"))]:
        assert not diary.search(path.read_text()), path
