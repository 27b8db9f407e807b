"""The device runtime stands alone: building, saving, opening and querying a bundle imports no
conversion toolchain, no server and none of d2r's lab modules.

Runs in a fresh interpreter: the test process itself has imported half of the world.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Top-level packages a device never needs (onnxruntime is a model runtime: allowed).
FORBIDDEN_PACKAGES = ("tensorflow", "torch", "cv2", "flask", "waitress", "d2r_convert", "d2r_server", "skimage", "sklearn", "onnx")
# d2r's research and evaluation tools.
FORBIDDEN_MODULES = ("d2r.evaluation", "d2r.evaluate", "d2r.mining", "d2r.feature_sources", "d2r.visualize", "d2r.datasets")

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
    assert not modules & set(FORBIDDEN_MODULES), sorted(modules & set(FORBIDDEN_MODULES))
