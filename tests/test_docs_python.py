"""The Python that README.md and docs/*.md show is Python this library runs, as the text around it says.

- Every ```python block parses, each `from latent_consistency... import X` / `import latent_consistency...` imports, and
  each attribute path it takes from an imported library name exists. A block whose paths all have a stand-in in
  `SUBSTITUTIONS` (a tiny model from tests/tiny_models.py) is run for real, on every stand-in.
- Every inline code span that names the library's Python (`parameterization.boundary_scalings`, `LCMGenerator.compile()`,
  `LCMGenerator.load(..., style_loras=[...])`, `model.consistency_model()`) names something that exists, and a call's
  keyword arguments are ones the function takes. `model` is the docs' name for a loaded `models.DiffusionModel`.
- The Python version the README asks for is one every pinned dependency installs on.

The shell commands are checked by tests/test_docs_commands.py; tests/test_readme.py runs the README's example on a tiny
Stable Diffusion LCM. docs/notes/ is a dated log, not instructions, and is not checked.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

from test_docs_commands import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "latent_consistency"
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
# The docs' placeholder paths, and the fixtures (tests/conftest.py) that stand in for them when a block runs. The README's
# example runs on a tiny SD LCM in tests/test_readme.py; here on the SDXL family its comment also names.
SUBSTITUTIONS = {"runs/lcd/lcm": ["tiny_sdxl_lcm"], "runs/demo/distill/lcm": ["tiny_sdxl_lcm"]}
# Names the docs give to objects rather than modules: `model` is a loaded model (`models.load_lcm` and its kin)
ALIASES = {"model": "models.DiffusionModel"}


@dataclasses.dataclass(frozen=True)
class Block:
    file: str
    line: int
    source: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _python_blocks() -> list[Block]:
    return [Block(file, start + 1, "\n".join(lines) + "\n") for file in DOCS
            for lang, start, lines in fenced_blocks((ROOT / file).read_text()) if lang in ("python", "py")]


BLOCKS = _python_blocks()


def _library_object(path: str):
    """The object `latent_consistency.<path>` names (a module, or attributes of one), or None when no module starts it."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if (PACKAGE / f"{module.replace('.', '/')}.py").is_file() or (PACKAGE / module.replace(".", "/") / "__init__.py").is_file():
            obj = importlib.import_module(f"latent_consistency.{module}")
            for depth, part in enumerate(parts[i:], start=i):
                if not hasattr(obj, part):
                    pytest.fail(f"latent_consistency.{'.'.join(parts[:depth])} has no {part} (the docs name latent_consistency.{path})")
                obj = getattr(obj, part)
            return obj
    return None


def _top_level_names() -> dict[str, str]:
    """{name: module} of every class and function the library defines at the top of a module (its `cli` aside)."""
    names = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        module = file.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        if module.startswith("cli") or module.endswith("__main__"):
            continue
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_"):
                names.setdefault(node.name, module)
    return names


TOP_LEVEL = _top_level_names()


# --- the ```python blocks ------------------------------------------------------------------------------------------------

def test_the_docs_have_python_blocks():
    assert [b.file for b in BLOCKS].count("README.md") == 2, "the README's two Python examples were not found"


def _attribute_chains(tree: ast.AST) -> list[list[str]]:
    """`a.b.c` of every attribute access whose root is a plain name, outermost chains only."""
    chains, inner = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts, cur = [], node
            while isinstance(cur, ast.Attribute):
                inner.add(id(cur))
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                chains.append([cur.id, *reversed(parts)])
    return chains


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_a_python_block_parses_and_names_what_exists(block):
    tree = ast.parse(block.source, filename=block.id)
    bound = {}  # name in the block -> path under latent_consistency
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "latent_consistency":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, "__path__") and not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a subpackage's module
                assert hasattr(module, alias.name), f"{block.id}: {node.module} has no {alias.name}"
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}".removeprefix("latent_consistency").lstrip(".")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "latent_consistency":
                    importlib.import_module(alias.name)
                    if alias.asname:
                        bound[alias.asname] = alias.name.removeprefix("latent_consistency").lstrip(".")
    for root, *attrs in _attribute_chains(tree):
        if root in bound and bound[root]:
            _library_object(".".join([bound[root], *attrs]))


def _runs() -> list:
    runs = []
    for block in BLOCKS:
        paths = set(re.findall(r"[\"']([^\"']*/[^\"']*)[\"']", block.source))
        if paths and paths <= SUBSTITUTIONS.keys():
            for fixtures in zip(*(SUBSTITUTIONS[p] for p in sorted(paths))):
                runs.append(pytest.param(block, dict(zip(sorted(paths), fixtures)), id=f"{block.id}-{'-'.join(fixtures)}"))
    return runs


@pytest.mark.parametrize(("block", "stand_ins"), _runs())
def test_a_python_block_runs_on_its_stand_ins(block, stand_ins, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block may save an image where it runs
    source = block.source
    for path, fixture in stand_ins.items():
        source = re.sub(rf"([\"']){re.escape(path)}\1", repr(str(request.getfixturevalue(fixture))), source)
    namespace: dict = {}
    exec(compile(source, block.id, "exec"), namespace)
    tensors = {name: value for name, value in namespace.items() if isinstance(value, torch.Tensor)}
    assert tensors, "the block computes no tensor"
    for name, value in tensors.items():
        assert torch.isfinite(value).all(), f"{name} is not finite"
    model = namespace["generator"].model if "generator" in namespace else namespace.get("model")
    if "images" in namespace and model is not None:  # the README's and the guide's: decoded images of the model's native size
        size = model.native_size
        assert namespace["images"].shape[1:] == (3, size, size)


# --- inline code spans -----------------------------------------------------------------------------------------------------

def _inline_spans() -> list[tuple[str, str]]:
    """(file:line, span) of every inline code span outside fenced blocks."""
    spans = []
    for file in DOCS:
        text = (ROOT / file).read_text()
        blanked = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
        for m in re.finditer(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", blanked):
            spans.append((f"{file}:{blanked.count(chr(10), 0, m.start()) + 1}", " ".join(m.group(1).split())))
    return spans


# `a.b.c`, `a.b()`, `A.load(..., kw=...)`, `A(...)(x, kw=...)`: a dotted name, then at most two calls
PYTHON_SPAN = re.compile(r"(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?P<calls>(?:\((?:[^()]|\([^()]*\))*\)){0,2})")


def _library_path(name: str) -> str | None:
    """The path under latent_consistency that a span's dotted name stands for, or None when it is not the library's."""
    root, _, rest = name.partition(".")
    if root in ALIASES:
        return ALIASES[root] + (f".{rest}" if rest else "")
    if root in TOP_LEVEL and (rest or root != root.lower() or "_" in root):  # a bare `generate` is the command
        return f"{TOP_LEVEL[root]}.{name}"
    if (PACKAGE / f"{root}.py").is_file() or (PACKAGE / root / "__init__.py").is_file():
        return name if rest else None  # a bare module name is prose (`world`, `schedule.py` is a file)
    return None


def _python_spans() -> list:
    found = []
    for where, span in _inline_spans():
        m = PYTHON_SPAN.fullmatch(span)
        if m and not span.endswith((".py", ".json", ".md")) and (path := _library_path(m.group("name"))) is not None:
            found.append(pytest.param(path, m.group("calls"), id=f"{where}:{span[:60]}"))
    return found


PYTHON_SPANS = _python_spans()


def test_the_docs_name_the_library_in_python():
    paths = {p.values[0] for p in PYTHON_SPANS}
    assert {"pipelines.LCMGenerator.load", "models.DiffusionModel.consistency_model", "parameterization.omega_from_guidance_scale"} <= paths


def _keywords(calls: str) -> list[list[str]]:
    """The keyword names of each call in `(...)(...)`."""
    return [re.findall(r"(?:^|,)\s*([A-Za-z_]\w*)\s*=(?!=)", args) for args in re.findall(r"\(((?:[^()]|\([^()]*\))*)\)", calls)]


@pytest.mark.parametrize(("path", "calls"), PYTHON_SPANS)
def test_an_inline_python_span_names_what_exists(path, calls):
    obj = _library_object(path)
    for keywords in _keywords(calls):
        assert callable(obj), f"{path} is not callable"
        target = obj.__call__ if not inspect.isclass(obj) and not inspect.isroutine(obj) else obj
        parameters = inspect.signature(target).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        unknown = [k for k in keywords if k not in parameters and not takes_any]
        assert not unknown, f"{target.__qualname__} takes no {', '.join(unknown)}: {inspect.signature(target)}"
        obj = obj if not inspect.isclass(obj) else obj.__call__  # `X(...)(...)`: the second call is the instance's


# --- the Python the README asks for -----------------------------------------------------------------------------------------

def test_the_readmes_python_version_installs_every_pinned_dependency():
    # was: "Python 3.10+" and requires-python >= 3.10, while the pinned diffusers, transformers, scikit-learn and fastapi
    # need 3.11: `make` on Python 3.10 failed in pip with no version of diffusers==0.42.1 to install
    claimed = re.search(r"Python (\d+\.\d+)\+", (ROOT / "README.md").read_text())
    assert claimed, "the README says which Python it needs"
    version = f"{claimed.group(1)}.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    requires = re.search(r'^requires-python = "([^"]+)"', pyproject, flags=re.M)
    assert requires and requires.group(1) == f">={claimed.group(1)}", "README and pyproject.toml ask for different Pythons"
    too_new = []
    for name in dict.fromkeys(re.findall(r'"([A-Za-z0-9_.-]+)==', pyproject)):  # the pinned ones, the test extras' too
        needs = importlib.metadata.metadata(name).get("Requires-Python")
        if needs and not SpecifierSet(needs).contains(version):
            too_new.append(f"{name} ({needs})")
    assert not too_new, f"Python {claimed.group(1)} cannot install {', '.join(too_new)}"


# --- what the library's own messages tell a Python user to call -----------------------------------------------------------

def test_a_generator_of_another_dtype_names_a_load_that_exists(tiny_lcm):
    # was: "... (Generator.load(path, device, dtype))", a method the base class does not have
    from latent_consistency.errors import UserError
    from latent_consistency.models import load_lcm
    from latent_consistency.pipelines import LCMGenerator

    with pytest.raises(UserError) as err:
        LCMGenerator(load_lcm(str(tiny_lcm)), torch.device("cpu"), torch.bfloat16)
    named = re.search(r"(\w+)\.load\(", str(err.value))
    assert named and named.group(1) == "LCMGenerator", str(err.value)
