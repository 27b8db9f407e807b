"""d2r_convert: turn the source models (MobileNet-V2 SSD, XFeat, DELF) into TFLite and ONNX.

One module per model (``ssd``, ``xfeat``, ``delf``) rebuilds the float network in Keras from
the weights of its source package and describes its conversion as a ``pipeline.Job``;
``export`` writes TFLite (fp32, fp16, int8) and ONNX (fp32, int8 static QDQ); ``pipeline``
runs a job: export, parity against the source (``compare``), latency in LiteRT and ONNX
Runtime (``runtimes``), the parity report and the manifest entries (``manifest``) that the
d2r runtime reads (``models/manifest.json``). ``cli`` adds ``d2r convert ssd|xfeat|delf``.

Heavy toolchains (TensorFlow, PyTorch, ONNX Runtime, LiteRT) are imported lazily through
:func:`d2r_convert._tools.require`, which turns a missing one into a
:class:`d2r.errors.ModelError` that says what to install.
"""
