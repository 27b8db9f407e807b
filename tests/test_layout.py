"""The runtime package keeps one module per concept and per file format (issue 17).

Read from the source with ``ast``, nothing imported: these checks fail when a module grows back
into a file that mixes concerns, when the index's file format starts to depend on its search,
when a Numba kernel calls a kernel of another module (Numba's disk cache would then miss a
change of the callee), or when a subpackage is missing from setup.cfg (``pip install .``
copies only the packages listed there).
"""

import ast
import configparser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SDK = REPO / "sdk" / "d2r"

MAX_LINES = 600
# Modules allowed over MAX_LINES, each with the reason; remove a line once its module is split.
LARGE_MODULES: dict[str, str] = {}


def _modules(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*.py"))}


def _relative_imports(path: Path) -> set[str]:
    """Sibling modules that ``path`` imports (``from .x import y``, ``from . import x``), and
    ``..`` for an import from the parent package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > 1:
                out.add("..")
            elif node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
    return out


def _absolute_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_no_module_of_the_runtime_package_is_over_600_lines():
    too_long = {}
    for name, path in _modules(SDK).items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and name not in LARGE_MODULES:
            too_long[name] = n
    assert not too_long, (f"modules of sdk/d2r over {MAX_LINES} lines: {too_long}; split them by concept "
                          "(or, with a reason, list them in LARGE_MODULES)")


def test_the_list_of_large_modules_is_current():
    stale = {}
    for name in LARGE_MODULES:
        path = SDK / name
        n = len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0
        if n <= MAX_LINES:
            stale[name] = n
    assert not stale, f"LARGE_MODULES lists modules that are gone or no longer over {MAX_LINES} lines: {stale}; remove them"


# Which modules of d2r.index may import which: the file format and the in-memory builder know
# only the shared postings, the search knows the builder, and Index (core) composes them all.
INDEX_IMPORTS = {
    "postings.py": set(),
    "format.py": {"postings"},
    "builder.py": {"postings"},
    "search.py": {"builder", "postings"},
    "core.py": {"builder", "format", "postings", "search"},
    "__init__.py": {"core", "format", "postings"},
}


@pytest.mark.parametrize("name", sorted(INDEX_IMPORTS))
def test_index_modules_import_only_their_layer(name):
    got = _relative_imports(SDK / "index" / name) - {".."}
    assert got <= INDEX_IMPORTS[name], f"d2r/index/{name} imports {sorted(got - INDEX_IMPORTS[name])} beyond its layer"


def test_every_index_module_has_a_layer():
    assert set(_modules(SDK / "index")) == set(INDEX_IMPORTS)


def test_the_index_file_format_does_not_import_search():
    fmt = SDK / "index" / "format.py"
    assert "search" not in _relative_imports(fmt)
    assert not any(m.startswith("d2r.index") for m in _absolute_imports(fmt))


# Which modules of d2r.features may import which: each model family's decoder stands alone
# (it knows its own outputs only), the extractor (core) holds the registry of decoders.
FEATURES_IMPORTS = {
    "xfeat.py": set(),
    "aliked.py": set(),
    "delf.py": set(),
    "core.py": {"aliked", "delf", "xfeat"},
    "__init__.py": {"core"},
}


@pytest.mark.parametrize("name", sorted(FEATURES_IMPORTS))
def test_features_modules_import_only_their_layer(name):
    got = _relative_imports(SDK / "features" / name) - {".."}
    assert got <= FEATURES_IMPORTS[name], f"d2r/features/{name} imports {sorted(got - FEATURES_IMPORTS[name])} beyond its layer"


def test_every_features_module_has_a_layer():
    assert set(_modules(SDK / "features")) == set(FEATURES_IMPORTS)


def test_every_model_family_decoder_is_registered():
    # A decoder module that the registry does not name would never be used.
    core = ast.parse((SDK / "features" / "core.py").read_text(encoding="utf-8"))
    registry = next(n for n in core.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == "DECODERS")
    named = {n.id for n in ast.walk(registry.value) if isinstance(n, ast.Name)}
    for family in ("xfeat", "aliked", "delf"):
        classes = {n.name for n in ast.parse((SDK / "features" / f"{family}.py").read_text(encoding="utf-8")).body
                   if isinstance(n, ast.ClassDef) and n.name.endswith("Decoder")}
        assert len(classes) == 1 and classes <= named, f"d2r/features/{family}.py: decoder {sorted(classes)} not in DECODERS"

def test_kernel_modules_do_not_import_each_other():
    # Numba's cache invalidation looks at a kernel's own file only: a kernel that calls a kernel
    # of another file keeps its stale compiled code when that file changes.
    for name, path in _modules(SDK / "kernels").items():
        if name == "__init__.py":
            continue
        assert not _relative_imports(path), f"d2r/kernels/{name} imports {sorted(_relative_imports(path))}"
        assert not any(m.startswith("d2r") for m in _absolute_imports(path)), f"d2r/kernels/{name} imports d2r"


def _public_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}


def test_d2r_kernels_reexports_every_kernel():
    kernels = set()
    for name, path in _modules(SDK / "kernels").items():
        if name != "__init__.py":
            kernels |= _public_functions(path)
    missing = kernels - _imported_names(SDK / "kernels" / "__init__.py")
    assert kernels and not missing, f"d2r.kernels does not re-export {sorted(missing)} (callers use kernels.NAME)"


def test_the_verification_features_file_stands_alone():
    # The features.d2rv format needs the features type only, not matching or RANSAC.
    assert _relative_imports(SDK / "verify" / "file.py") - {".."} <= {"features"}


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg", encoding="utf-8")
    listed = set(cfg["options"]["packages"].split())
    roots = dict(line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines())
    found = set()
    for top, folder in roots.items():
        base = REPO / folder.strip()
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((top.strip(), *rel)))
    assert found - listed == set(), f"packages missing from setup.cfg (pip install . would leave them out): {sorted(found - listed)}"
    assert listed - found == set(), f"setup.cfg lists packages that do not exist: {sorted(listed - found)}"
