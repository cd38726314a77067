"""The Dockerfile, checked without a Docker engine: everything it copies (globs matched as
Docker matches them) is in the build context, every module and what the scripts read is
copied, it installs the project the way the README says, it runs as a non-root user, it has
a CUDA variant, and its demo defaults fit the training defaults."""

import json
import re
import shlex

import pytest
import yaml

from .conftest import PROJECT_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
README = PROJECT_ROOT / "docs" / "deployment.md"  # the Docker instructions
# `pip install .`, `pip install ".[demo]"` and the like: the command that installs the project.
PROJECT_INSTALL = re.compile(r"pip install (?:--\S+ )*(\"\.(?:\[[\w,-]+\])?\"|\.(?:\[[\w,-]+\])?)(?=\s|$)")


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue  # comments (and parser directives) may sit between continuation lines
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, arguments = pending.strip().partition(" ")
            result.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return result


def json_or_words(arguments: str) -> list[str]:
    """A COPY's arguments in JSON form (`["a", "b", "./"]`), or else split on spaces: as Docker
    reads them, a glob such as `[a-r]*.py` that is not JSON is a word."""
    try:
        words = json.loads(arguments)
    except ValueError:
        return shlex.split(arguments)
    return words if isinstance(words, list) else shlex.split(arguments)


def copy_sources(before_install: bool = False) -> list[str]:
    """Sources of every COPY/ADD from the build context (not `--from` another stage), as
    written (globs included); with `before_install`, only those before the project's install."""
    sources = []
    for keyword, arguments in instructions():
        if before_install and keyword == "RUN" and PROJECT_INSTALL.search(arguments):
            return sources
        if keyword not in ("COPY", "ADD"):
            continue
        words = json_or_words(arguments)
        if any(word.startswith("--from") for word in words):
            continue
        sources += [word for word in words if not word.startswith("--")][:-1]
    return sources


def glob_regex(glob: str) -> str:
    """A regex for a Go filepath.Match pattern, the globs of COPY sources and .dockerignore
    lines (`*`, `?` and `[...]` stay within a folder), plus .dockerignore's `**` across
    folders. Written by hand: no maintained Python package implements Docker's rules."""
    regex = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?|\[\^?\]?[^]]*\]|\\.)", glob):
        if token.startswith("[") and len(token) > 2:
            body = token[1:-1]
            regex += "[^/" + body[1:] + "]" if body.startswith("^") else "(?!/)[" + body + "]"
        elif token.startswith("\\") and len(token) == 2:
            regex += re.escape(token[1])
        else:
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return regex


def dockerignore_patterns() -> list[tuple[re.Pattern, bool]]:
    """(regex, is_exception) per .dockerignore line, as Docker reads them: `!` for exceptions."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        patterns.append((re.compile(glob_regex(line.lstrip("!").strip().strip("/"))), line.startswith("!")))
    return patterns


def folders_and_path(path: str) -> list[str]:
    """`a/b/c` -> [`a`, `a/b`, `a/b/c`]: what a pattern may match to take in `path`."""
    parts = path.strip("/").split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def is_excluded(path: str, patterns) -> bool:
    """A path is left out when the last pattern matching it, or one of its parent folders,
    is not an exception."""
    excluded = False
    for regex, exception in patterns:
        if any(regex.fullmatch(candidate) for candidate in folders_and_path(path)):
            excluded = not exception
    return excluded


def build_context(patterns) -> list[str]:
    """Every file Docker sends as the build context, relative to the project."""
    files = (str(path.relative_to(PROJECT_ROOT)) for path in PROJECT_ROOT.rglob("*") if path.is_file() and ".git" not in path.parts)
    return sorted(path for path in files if not is_excluded(path, patterns))


def copied_files(source: str, context: list[str]) -> set[str]:
    """The files of the build context that COPY `source` puts into the image: those the source
    names, or a glob matches, itself or as a folder they are in. Docker matches COPY globs
    against the context, so a file .dockerignore leaves out is never copied."""
    source = source.strip("/").removeprefix("./")
    if source in ("", "."):
        return set(context)
    regex = re.compile(glob_regex(source))
    return {path for path in context if any(regex.fullmatch(candidate) for candidate in folders_and_path(path))}


def readme_deployment_section() -> str:
    """The README's "Deployment" section, down to the next heading of its level or above
    (`# comments` inside code blocks are not headings)."""
    section, level, in_code = None, 0, False
    for line in README.read_text().splitlines():
        in_code ^= line.startswith("```")
        heading = None if in_code else re.match(r"(#+) (.*)", line)
        if section is None:
            if heading and heading.group(2).strip() == "Deployment":
                section, level = [], len(heading.group(1))
        elif heading and len(heading.group(1)) <= level:
            break
        else:
            section.append(line)
    assert section is not None, "README.md has no Deployment section"
    return "\n".join(section)


def test_dockerignore_matches_like_docker():
    patterns = [(re.compile(glob_regex(g)), e) for g, e in [("outputs", False), ("**/__pycache__", False), ("tests", False)]]
    assert is_excluded("outputs/run/model.safetensors", patterns)
    assert is_excluded("configs/__pycache__/x.pyc", patterns) and is_excluded("__pycache__/x.pyc", patterns)
    assert not is_excluded("configs/backbone_only.yaml", patterns)
    assert is_excluded("tests/test_app.py", patterns + [(re.compile(glob_regex("tests/keep.py")), True)])
    assert not is_excluded("tests/keep.py", patterns + [(re.compile(glob_regex("tests/keep.py")), True)])


def test_globs_match_like_go_filepath_match():
    def matches(glob, path):
        return re.fullmatch(glob_regex(glob), path) is not None

    assert matches("*.py", "app.py") and not matches("*.py", "tests/test_app.py") and not matches("*.py", "app.pyc")
    assert matches("configs/*.yaml", "configs/backbone_only.yaml") and not matches("configs/*.yaml", "configs/accelerate/multi_gpu.yaml")
    assert matches("run_?val.py", "run_eval.py") and not matches("run_?val.py", "run_/val.py")
    assert matches("[a-c]*.py", "app.py") and not matches("[a-c]*.py", "run_eval.py")
    assert matches("[^a-c]*.py", "run_eval.py") and not matches("[^a-c]*.py", "app.py")
    assert matches("\\*.py", "*.py") and not matches("\\*.py", "app.py")
    context = ["app.py", "assets/examples/ship.png", "tests/test_app.py"]
    assert copied_files("*.py", context) == {"app.py"}
    assert copied_files("assets/", context) == copied_files("./assets", context) == {"assets/examples/ship.png"}
    assert copied_files("a*", context) == {"app.py", "assets/examples/ship.png"}  # a matched folder brings its files
    assert copied_files(".", context) == set(context)


def test_everything_copied_exists_and_is_in_the_build_context():
    patterns = dockerignore_patterns()
    context = build_context(patterns)
    sources = copy_sources()
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        if not any(character in source for character in "*?["):
            assert (PROJECT_ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        # Docker stops the build when a source, or every match of a glob, is left out of the context.
        assert copied_files(source, context), f"the Dockerfile copies {source}, which .dockerignore leaves out or nothing matches"


def test_every_top_level_module_and_the_default_settings_are_copied():
    # The scripts import each other (run_train imports hub_folder, app imports attention_maps):
    # a new module that is not copied breaks the image, not the tests.
    context = build_context(dockerignore_patterns())
    copied = set().union(*(copied_files(source, context) for source in copy_sources()))
    # Also what they read: default.yaml, the config files (benchmark.py's and Accelerate's), the
    # demo's examples.
    needed = {path.name for path in PROJECT_ROOT.glob("*.py")} | {"default.yaml"}
    needed |= {str(path.relative_to(PROJECT_ROOT)) for path in PROJECT_ROOT.glob("configs/**/*.yaml")}
    needed |= {str(path.relative_to(PROJECT_ROOT)) for path in PROJECT_ROOT.glob("assets/examples/*.png")}
    missing = sorted(needed - copied)
    assert not missing, f"the Dockerfile does not copy {missing}"
    assert not [path for path in copied if path.startswith(("tests/", "outputs/", "docs/"))], "the image holds no tests, runs or docs"


def test_project_install_has_what_pyproject_needs():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {f"{module}.py" for module in pyproject["tool"]["setuptools"]["py-modules"]}
    if not any(PROJECT_INSTALL.search(arguments) for keyword, arguments in instructions() if keyword == "RUN"):
        pytest.fail("the Dockerfile never installs the project with pip")
    context = build_context(dockerignore_patterns())
    copied = set().union(*(copied_files(source, context) for source in copy_sources(before_install=True)))
    assert needed <= copied, f"{sorted(needed - copied)} must be copied before the project is installed"


def test_readme_documents_the_install_command_the_image_uses():
    commands = [m.group(0) for _, arguments in instructions() for m in [PROJECT_INSTALL.search(arguments)] if m]
    assert len(commands) == 1, f"expected one project install in the Dockerfile, found {commands}"
    documented = readme_deployment_section()
    assert commands[0] in documented, f"README's Deployment section should show `{commands[0]}`, as the image runs it"


def test_readme_build_args_exist_in_the_dockerfile():
    steps = instructions()
    declared = {arguments.split("=")[0] for keyword, arguments in steps if keyword == "ARG"}
    stages = {arguments.split(" AS ")[-1] for keyword, arguments in steps if keyword == "FROM" and " AS " in arguments}
    for name, value in re.findall(r"--build-arg (\w+)=([\w.-]+)", readme_deployment_section()):
        assert name in declared, f"README passes --build-arg {name}, which the Dockerfile does not declare"
        if name == "TORCH":
            assert f"torch-{value}" in stages, f"README builds with TORCH={value}, but there is no stage torch-{value}"


def test_runs_as_a_non_root_user():
    users = [arguments for keyword, arguments in instructions() if keyword == "USER"]
    assert users, "the image runs as root: no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_has_a_cuda_variant_with_the_same_torch():
    steps = instructions()
    first_from = next(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    assert ("ARG", "TORCH=cpu") in steps[:first_from], "the CPU image is the default, chosen by ARG TORCH"
    stages, current = {}, None
    for keyword, arguments in steps:
        if keyword == "FROM":
            current = arguments.split(" AS ")[-1] if " AS " in arguments else arguments
            stages[current] = []
        elif current:
            stages[current].append((keyword, arguments))
    assert {"torch-cpu", "torch-cuda"} <= set(stages)
    final = [arguments for keyword, arguments in steps if keyword == "FROM"][-1]
    assert final.startswith("torch-${TORCH}"), "the final stage must build on the torch stage that TORCH names"

    def pins(stage):
        run = " ".join(arguments for keyword, arguments in stages[stage] if keyword == "RUN")
        return sorted(re.findall(r"\b(torch(?:vision)?==\S+)", run))

    assert pins("torch-cpu") == pins("torch-cuda") and len(pins("torch-cpu")) == 2
    assert "download.pytorch.org/whl/cpu" in " ".join(a for _, a in stages["torch-cpu"])


def test_default_command_serves_the_demo_on_the_trained_model():
    steps = instructions()
    env = {}
    for keyword, arguments in steps:
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(arguments))
    assert ("EXPOSE", "7860") in steps
    assert env["GRADIO_SERVER_NAME"] == "0.0.0.0", "inside a container the demo must listen beyond loopback"
    cmd = [arguments for keyword, arguments in steps if keyword == "CMD"][-1]
    assert json.loads(cmd) == ["python", "app.py"]
    workdir = [arguments for keyword, arguments in steps if keyword == "WORKDIR"][-1]
    default_output = yaml.safe_load((PROJECT_ROOT / "default.yaml").read_text())["training"]["output_dir"]
    assert env["HYBRID_VIT_MODEL"] == f"{workdir}/{default_output}", "the demo should serve what training writes by default"
