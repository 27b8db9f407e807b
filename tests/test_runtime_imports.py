"""The device runtime stands alone: building, saving, opening and querying a bundle imports no
conversion toolchain, no server and none of d2r's lab modules.

Runs in a fresh interpreter: the test process itself has imported half of the world.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Top-level packages a device never needs (onnxruntime is a model runtime: allowed).
FORBIDDEN_PACKAGES = ("tensorflow", "torch", "cv2", "flask", "waitress", "d2r_lab", "d2r_convert", "d2r_server", "skimage", "sklearn", "onnx", "ray")

SCRIPT = """
import json, sys, tempfile
from pathlib import Path

sys.path.insert(0, {tests!r})
import d2r
from shared_data import ukbench_images

photos = ukbench_images()[:4]
with tempfile.TemporaryDirectory() as tmp:
    bundle = Path(tmp) / "tiny.d2r"
    with d2r.Engine.create(features="xfeat", detector=None, threads=1, verification_features=200) as engine:
        engine.train_codebook(photos, size=16, progress=False)
        engine.add_images(photos, progress=False)
        engine.save(bundle)
    with d2r.Engine.open(bundle, threads=1) as engine:
        result = engine.query(photos[1], top_k=2, verify=True)
print(json.dumps({{"hits": [h.image_id for h in result.hits], "modules": sorted(sys.modules)}}))
"""


@pytest.mark.slow
def test_a_query_imports_no_toolchain_server_or_lab_module():
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(REPO / "tests"))], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["hits"][0] == "ukbench00001.jpg"  # the query photo is in the collection: it ranks first
    modules = set(out["modules"])
    assert "d2r.engine" in modules and "d2r.verify" in modules  # the probe did run the runtime
    packages = {m.split(".")[0] for m in modules}
    assert not packages & set(FORBIDDEN_PACKAGES), sorted(packages & set(FORBIDDEN_PACKAGES))


def imports_of(path: Path, package: str) -> set[str]:
    """Every module an import statement of ``path`` names (relative imports resolved), at any
    depth of the file: imports inside functions are edges of the graph too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = [package, *path.relative_to(REPO / "sdk" / package).with_suffix("").parts]
    if here[-1] == "__init__":
        here.pop()
    else:
        here.pop()  # the module's own name: relative imports start from its package
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_the_runtime_package_has_no_edge_to_the_lab_the_converters_or_the_server():
    """Static: no module of sdk/d2r imports (even lazily, inside a function) d2r_lab, the
    converters, the server or a training toolchain. The device runtime stands alone."""
    edges = {}
    for path in sorted((REPO / "sdk" / "d2r").rglob("*.py")):
        bad = sorted(m for m in imports_of(path, "d2r") if m.split(".")[0] in FORBIDDEN_PACKAGES)
        if bad:
            edges[str(path.relative_to(REPO))] = bad
    assert not edges, edges


def test_the_lab_depends_on_the_runtime_not_the_other_way():
    """The lab does import the runtime (it evaluates the pipeline that ships)."""
    lab = set()
    for path in (REPO / "sdk" / "d2r_lab").rglob("*.py"):
        lab |= {m for m in imports_of(path, "d2r_lab") if m.split(".")[0] == "d2r"}
    assert "d2r.engine" in lab or "d2r.pipeline" in lab
