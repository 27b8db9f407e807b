"""d2r_lab: the laboratory beside the device runtime.

Evaluation on Revisited Oxford/Paris (``evaluate``: the protocol and mAP; ``evaluation``:
``d2r eval``, which runs the pipeline of :mod:`d2r.pipeline`), dataset downloads
(``datasets``), landmark box mining and the detector fine-tuning command (``mining``,
``landmarks``), feature sources without a converted model (``feature_sources``: RootSIFT,
torch ALIKED) and the picture of a query (``visualize``: ``d2r show``).

The device runtime (``d2r``) never imports this package; this package imports the runtime.
Installed with the project; its own dependencies come with the ``lab`` extra.
"""
