"""The distributed build: ``d2r build PHOTOS -o OUT.d2r --ray auto|ADDRESS`` on a Ray cluster.

A package of its own beside the device runtime (:mod:`d2r`), because it needs Ray (the ``ray``
extra: ``pip install 'd2r[ray]'``), which a device never installs nor imports. It runs the
runtime's own stage objects (:class:`d2r.pipeline.Pipeline`) on the workers and the runtime's
own codebook training, index and bundle writer on the driver, so a bundle built here is the
bundle ``d2r build`` writes on one machine, index byte for byte.

- :mod:`.ray_build`: the driver (:func:`build`, and :func:`add` for photos added to a bundle),
  the only module that imports ray;
- :mod:`.worker`: what a worker (a Ray actor) does with a batch of photos;
- :mod:`.shards`: the shard folder the workers write and a resumed build reads.
"""

from .ray_build import BuildReport, ClusterError, add, build

__all__ = ["BuildReport", "ClusterError", "add", "build"]
