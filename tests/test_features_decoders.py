"""The model-family decoders of d2r.features: which family a manifest entry is, the decoder the
extractor picks for it, and DELF's receptive-field decoding (no DELF weights ship: its manifest
entry comes from the converter, its outputs from a model stand-in with known grids)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import d2r
from d2r.errors import ModelError
from d2r.features import DECODERS, LocalFeatureExtractor, aliked, delf, model_family, xfeat
from d2r.manifest import SCHEMA_VERSION, load_manifest
from d2r_convert import delf as delf_convert


def _shipped(name: str):
    return next(m for m in load_manifest().models if m.name == name and m.format == "onnx")


def test_the_package_exports_the_extractor():
    assert d2r.LocalFeatureExtractor is LocalFeatureExtractor
    assert d2r.Features is d2r.features.Features
    assert set(DECODERS) == {"xfeat", "aliked", "delf"}


@pytest.mark.parametrize("name, family, cls", [("xfeat", "xfeat", xfeat.XFeatDecoder), ("aliked_t16", "aliked", aliked.AlikedDecoder),
                                               ("aliked_n16", "aliked", aliked.AlikedDecoder)])
def test_each_shipped_model_gets_its_family_decoder(name, family, cls):
    entry = _shipped(name)
    assert model_family(entry) == family
    decoder = DECODERS[family](entry)
    assert type(decoder) is cls and decoder.family == family
    assert decoder.dim == entry.defaults["descriptor_dim"]


@pytest.fixture()
def delf_entry(tmp_path):
    """The manifest entry the DELF converter writes (256x256, PCA to 128), read back by the runtime."""
    raw = delf_convert.manifest_entry(256, 256, 128, "test")
    raw.update(file="delf_256x256_fp32.onnx", format="onnx", precision="fp32", sha256="0" * 64)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "models": [raw]}))
    return load_manifest(tmp_path / "manifest.json").models[0]


class _GridModel:
    """Stands in for a DELF model file: the same attention and descriptor grids for every input."""

    def __init__(self, entry, attention, descriptors):
        order = [o.name for o in entry.outputs]
        self.outs = [attention[None, :, :, None] if n == "attention" else descriptors[None] for n in order]
        self.inputs = []

    def run(self, x):
        self.inputs.append(x.shape)
        return self.outs


def test_delf_features_are_receptive_field_centres(delf_entry):
    assert model_family(delf_entry) == "delf"
    rng = np.random.default_rng(0)
    att = np.zeros((8, 8), np.float32)
    att[1, 2], att[5, 3], att[6, 7], att[0, 0] = 150.0, 300.0, 500.0, 99.0  # 99: below DELF's threshold of 100
    desc = rng.standard_normal((8, 8, 128)).astype(np.float32)
    model = _GridModel(delf_entry, att, desc)
    ex = LocalFeatureExtractor(model, entry=delf_entry, scales=(1.0,))
    assert isinstance(ex.decoder, delf.DelfDecoder) and ex.dim == 128
    # A 256 x 200 photo fills the 256 x 256 canvas but the last 56 columns: cell (6, 7) is centred at
    # x = 32 * 7 - 145 + 145 = 224, in the padding, and is dropped.
    f = ex.extract(np.full((256, 200, 3), 128, np.uint8))
    assert model.inputs == [(1, 256, 256, 3)]
    rf, stride, pad = 291, 32, 145  # DELF's block3 (the converter's geometry)
    assert {k: delf_entry.geometry[k] for k in ("receptive_field", "stride", "padding")} == {"receptive_field": rf, "stride": stride, "padding": pad}
    want_yx = [[stride * gy - pad + (rf - 1) / 2, stride * gx - pad + (rf - 1) / 2] for gy, gx in ((5, 3), (1, 2))]
    np.testing.assert_array_equal(f.locations, np.array(want_yx, np.float32))
    np.testing.assert_array_equal(f.scores, np.array([300.0, 150.0], np.float32))
    want = desc[[5, 1], [3, 2]]
    np.testing.assert_allclose(f.descriptors, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(f.scales, np.ones(2, np.float32))


def test_an_unknown_family_is_a_clear_error():
    entry = _shipped("xfeat")
    odd = dataclasses.replace(entry, geometry={**entry.geometry, "decoding": "superpoint"})
    with pytest.raises(ModelError, match=r"'xfeat'.*unknown local-feature decoding 'superpoint' \(known: aliked, delf, xfeat\)"):
        LocalFeatureExtractor(object(), entry=odd)


def test_missing_outputs_are_named(delf_entry):
    entry = _shipped("xfeat")
    no_desc = dataclasses.replace(entry, outputs=tuple(o for o in entry.outputs if o.name != "descriptors"))
    with pytest.raises(ModelError, match="'xfeat' has no 'descriptors' output"):
        LocalFeatureExtractor(object(), entry=no_desc)
    no_att = dataclasses.replace(delf_entry, outputs=tuple(o for o in delf_entry.outputs if o.name != "attention"))
    with pytest.raises(ModelError, match="'delf'.*needs an 'attention'"):
        LocalFeatureExtractor(object(), entry=no_att)
    no_geo = dataclasses.replace(delf_entry, geometry={"stride": 32})
    with pytest.raises(ModelError, match=r"'delf'.*geometry lacks \['receptive_field'\]"):
        LocalFeatureExtractor(object(), entry=no_geo)
