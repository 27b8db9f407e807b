"""``d2r build --ray``: the build of :class:`d2r.Engine`, spread over a Ray cluster.

    1. features   workers (Ray actors, one per CPU, each holding one loaded Pipeline) take
                  batches of photos and write their features and regions as shards;
    2. codebook   the driver trains the codebook on the sample a single-machine build draws
                  (the same DescriptorSample rule and seed, read from the shards), or uses the
                  one given;
    3. aggregate  workers aggregate each batch's regions with that codebook (and pack its
                  verification features) into aggregation shards;
    4. merge      the driver adds them to one index in the photos' order and saves the bundle.

:func:`add` runs steps 1 (with aggregation, as for a given codebook) and 4 for photos added to
an existing bundle: the workers load the bundle's own models (copied into the shard folder) and
aggregate with its codebook; the driver appends to the bundle's index and saves a new version
(the rules of :mod:`d2r.adding`, the same bundle as :func:`d2r.adding.add_to_bundle`).

The index file is therefore byte for byte the one a single-machine build writes with the same
codebook and configuration; photos that cannot be read are skipped and listed the same way. A
build that was killed resumes from its shards (``resume=True``); a worker that dies is
restarted by Ray and its batch retried. The shard folder (:mod:`d2r_build.shards`) must be on a
file system that every node sees, like the photos (same paths on every node).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2r._progress import duration
from d2r.adding import AddReport, check_unchanged, split_existing
from d2r.bundle.folder import read_bundle_info
from d2r.codebook import Codebook, train_codebook
from d2r.config import EngineConfig
from d2r.engine import Engine, check_bundle_target
from d2r.errors import D2RError, ImageError, InputError
from d2r.pipeline import CODEBOOK_SAMPLE, DescriptorSample

from .shards import ShardFolder, default_folder
from .worker import PhotoWorker

log = logging.getLogger("d2r")

#: photos per batch (fixed by the plan: a resumed build keeps it whatever the cluster)
BATCH_SIZE = 16
#: batches queued on each worker at a time (the next one waits while the current one runs)
IN_FLIGHT = 2
#: restarts of a worker that died, and retries of the batch it held
MAX_RESTARTS = 3
CODEBOOK_ITERATIONS = 20


class ClusterError(D2RError, RuntimeError):
    """The Ray cluster could not be reached, or a worker failed for good."""


@dataclass
class BuildReport:
    """What :func:`build` did."""

    output: Path
    n_images: int
    skipped: dict
    seconds: float
    workers: int
    #: batches of each phase found complete in the shard folder (a resumed build) and computed now
    reused: dict = field(default_factory=dict)
    computed: dict = field(default_factory=dict)
    #: process ids of the workers that returned a batch (a restarted worker has a new one)
    worker_pids: set = field(default_factory=set)
    #: seconds of each step: start (cluster and workers), features, codebook, aggregated, merge
    phases: dict = field(default_factory=dict)
    #: ids added to the index (in order) and the bundle's version written (0: none written)
    added: list = field(default_factory=list)
    version: int = 0

    @property
    def photos_per_second(self) -> float:
        return (self.n_images + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


class Progress:
    """``features: 120/1000 photos, 3.1 photos/s, 4m40s left`` on stderr, at most once a second
    (``progress`` True), or ``progress(stage, done, total)`` (a callable), or nothing."""

    def __init__(self, progress):
        self.progress = progress
        self.open = False

    def start(self, stage: str, done: int, total: int, unit: str = "photos") -> None:
        self.stage, self.total, self.first, self.t0, self.last, self.unit = stage, total, done, time.monotonic(), 0.0, unit
        self.report(done, force=True)

    def report(self, done: int, force: bool = False) -> None:
        if callable(self.progress):
            self.progress(self.stage, done, self.total)
            return
        if not self.progress:
            return
        now = time.monotonic()
        finished = done >= self.total
        if not (force or finished or now - self.last > 1.0):
            return
        self.last = now
        rate = (done - self.first) / (now - self.t0) if now > self.t0 and done > self.first else 0.0
        text = f"{self.stage}: {done}/{self.total} {self.unit}"
        if rate > 0:
            text += f", {rate:.1f} {self.unit}/s" + ("" if finished else f", {duration((self.total - done) / rate)} left")
        print(f"\r{text}\033[K", end="\n" if finished else "", file=sys.stderr, flush=True)
        self.open = not finished

    def end_line(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``host:port`` address must accept a connection (``ray://`` client addresses are left to Ray)."""
    if "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"address: expected 'auto' or HOST:PORT of a Ray head (ray start --head prints it), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"address: no Ray cluster answers at {address} ({exc.strerror or exc})") from None


def build(images, output, config: EngineConfig, *, address: str = "auto", workers: int | None = None, codebook: Codebook | None = None,
          codebook_size: int | str = "auto", seed: int = 0, metadata: dict | None = None, on_error: str = "skip", resume: bool = False,
          shards=None, batch_size: int = BATCH_SIZE, threads: int | None = 1, progress=True, protect=(), timeout: float = 600.0) -> BuildReport:
    """Build the bundle ``output`` from ``images`` (paths) on a Ray cluster.

    address: ``"auto"`` starts a local cluster on this machine (``workers`` CPUs, default all),
    anything else is the address of a running cluster (``ray start --head`` prints it).
    workers: actors to start (default: one per CPU of the cluster). codebook: use this one
    instead of training one (``codebook_size``, ``seed``: as :meth:`d2r.Engine.train_codebook`).
    metadata: image id -> dict. on_error: ``"skip"`` (default) or ``"raise"``, as
    :meth:`d2r.Engine.add_images`. shards: the shard folder (default ``OUTPUT.shards`` beside
    the bundle). resume: continue from the shards of a build of the same photos and options
    that did not finish. threads: model threads per worker. timeout: seconds the driver waits
    for any batch before it gives up on the cluster (:class:`ClusterError`).
    """
    return RayBuild(images, output, config, address=address, workers=workers, codebook=codebook, codebook_size=codebook_size, seed=seed,
                    metadata=metadata, on_error=on_error, resume=resume, shards=shards, batch_size=batch_size, threads=threads,
                    progress=progress, protect=protect, timeout=timeout).run()


def add(bundle, images, *, address: str = "auto", workers: int | None = None, metadata: dict | None = None, existing: str = "refuse",
        on_error: str = "skip", resume: bool = False, shards=None, batch_size: int = BATCH_SIZE, threads: int | None = 1, progress=True,
        protect=(), timeout: float = 600.0) -> AddReport:
    """Add ``images`` (paths) to the bundle folder ``bundle`` on a Ray cluster: the same bundle
    as :func:`d2r.adding.add_to_bundle` (its rules: ids in the bundle already refused before any
    work, or left out with ``existing="skip"``; bad photos skipped and listed; a new version
    written atomically, none when no photo was added). The other arguments as :func:`build`;
    the shard folder defaults to ``BUNDLE.shards`` and holds a copy of the bundle's models."""
    t0 = time.perf_counter()
    bundle = Path(bundle)
    images = [Path(p) for p in images]
    if not images:
        raise InputError("images: no photos to add")
    check_bundle_target(bundle, protect=protect)
    checksum = read_bundle_info(bundle)["checksum"]
    with Engine.open(bundle, threads=threads) as engine:  # every file checked before any work
        assert engine.index is not None
        todo, present = split_existing(bundle, engine.index, images, existing)
        config, codebook, version, n_images = engine.config, engine.codebook, engine.bundle_version, len(engine.index)
    if not todo:
        return AddReport(bundle, version, n_images, [], {}, present, time.perf_counter() - t0)
    report = RayBuild(todo, bundle, config, address=address, workers=workers, codebook=codebook, metadata=metadata, on_error=on_error,
                      resume=resume, shards=shards, batch_size=batch_size, threads=threads, progress=progress, protect=protect,
                      timeout=timeout, base=bundle, base_checksum=checksum).run()
    return AddReport(bundle, report.version or version, report.n_images, report.added, report.skipped, present,
                     time.perf_counter() - t0, report.workers)


class RayBuild:
    """One distributed build (see :func:`build`, which takes the same arguments; ``base``: the
    bundle that :func:`add` adds to, whose bundle.json checksum was ``base_checksum``)."""

    def __init__(self, images, output, config: EngineConfig, *, address="auto", workers=None, codebook=None, codebook_size="auto", seed=0,
                 metadata=None, on_error="skip", resume=False, shards=None, batch_size=BATCH_SIZE, threads=1, progress=True, protect=(),
                 timeout=600.0, base=None, base_checksum=None):
        self.images = [Path(p) for p in images]
        if not self.images:
            raise InputError("images: no images to build from")
        self.ids = [p.name for p in self.images]
        if len(set(self.ids)) != len(self.ids):
            raise InputError("images: two photos have the same file name (the image id)")
        if on_error not in ("skip", "raise"):
            raise InputError(f"on_error: expected 'skip' or 'raise', got {on_error!r}")
        if workers is not None and int(workers) < 1:
            raise InputError(f"workers: expected at least 1, got {workers}")
        if int(batch_size) < 1:
            raise InputError(f"batch_size: expected at least 1, got {batch_size}")
        if codebook is not None and not isinstance(codebook, Codebook):
            raise InputError(f"codebook: expected a d2r.Codebook, got {type(codebook).__name__}")
        self.output = Path(output)
        self.config = EngineConfig(**asdict(config)).check()
        self.address = str(address)
        self.n_workers = None if workers is None else int(workers)
        self.codebook = codebook
        self.codebook_size, self.seed = codebook_size, int(seed)
        self.metadata = metadata
        self.on_error = on_error
        self.resume = bool(resume)
        # absolute: the workers' working folder is not the driver's
        self.folder = ShardFolder(Path(shards if shards is not None else default_folder(self.output)).absolute())
        self.batch_size = int(batch_size)
        self.threads = threads
        self.progress = Progress(progress)
        self.protect = list(protect)
        self.timeout = float(timeout)
        self.n_batches = math.ceil(len(self.images) / self.batch_size)
        self.base = None if base is None else Path(base)
        if self.base is not None and self.codebook is None:
            raise InputError("codebook: adding to a bundle needs the bundle's codebook")
        self.base_checksum = base_checksum
        self.actors: list = []
        self.report = BuildReport(self.output, 0, {}, 0.0, 0)
        self._ray: Any = None  # the ray module, imported by run()
        self._connected = False

    # -- the plan -------------------------------------------------------------------------------
    def plan(self) -> dict:
        origin = ({"given": self.codebook.checksum} if self.codebook is not None else
                  {"size": self.codebook_size, "seed": self.seed, "max_descriptors": CODEBOOK_SAMPLE, "iterations": CODEBOOK_ITERATIONS})
        plan = {"photos": [str(p.absolute()) for p in self.images], "config": asdict(self.config), "batch_size": self.batch_size,
                "codebook": origin}
        if self.base is not None:
            plan["add_to"] = str(self.base.absolute())
        return plan

    def batch(self, b: int) -> list[tuple[str, str, str]]:
        """(image id, absolute path, the path as given) of each photo of batch ``b``: workers read
        the absolute path and name the given one in errors, as a single-machine build does."""
        lo = b * self.batch_size
        return [(self.ids[i], str(self.images[i].absolute()), str(self.images[i])) for i in range(lo, min(lo + self.batch_size, len(self.images)))]

    # -- the build ------------------------------------------------------------------------------
    def run(self) -> BuildReport:
        t0 = time.perf_counter()
        phases = self.report.phases
        check_bundle_target(self.output, protect=self.protect)  # before hours of work, not after
        if self.folder.root.resolve() == self.output.resolve():
            raise InputError(f"shards: {self.folder.root} is the bundle folder itself")
        self._import_ray()  # a missing extra is said before any folder is made
        try:
            self._connect()  # an unreachable cluster leaves no shard folder behind
            self.folder.start(self.plan(), self.resume)
            if self.base is not None:
                self.folder.copy_models(self.base / "models")
            self._start_workers()
            phases["start"] = time.perf_counter() - t0
            root = str(self.folder.root)
            if self.codebook is not None:  # one pass: features, regions, aggregation; no feature shards
                codebook = self._timed("codebook", self._codebook)
                self._timed("aggregated", self._phase, "aggregated", lambda actor, b: actor.build.remote(root, b, self.batch(b)),
                            self._check_photos)
            else:
                self._timed("features", self._phase, "features", lambda actor, b: actor.features.remote(root, b, self.batch(b)),
                            self._check_photos)
                codebook = self._timed("codebook", self._codebook)
                self._timed("aggregated", self._phase, "aggregated", lambda actor, b: actor.aggregate.remote(root, b))
            self._stop_workers()
            self._timed("merge", self._merge, codebook)
        finally:
            self.progress.end_line()
            self._stop_workers()
            self._disconnect()
        self.folder.remove()
        self.report.seconds = time.perf_counter() - t0
        return self.report

    def _timed(self, name: str, func, *args):
        t = time.perf_counter()
        try:
            return func(*args)
        finally:
            self.report.phases[name] = time.perf_counter() - t

    def _import_ray(self) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ClusterError(f"a distributed build needs Ray, the 'ray' extra: pip install 'd2r[ray]' ({exc})") from None
        self._ray = ray

    def _connect(self) -> None:
        ray = self._ray
        assert ray is not None
        if ray.is_initialized():  # the caller connected already (a notebook, a test)
            return
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if self.address != "auto":
            _check_reachable(self.address)  # ray.init retries an address where nothing listens for minutes
        try:
            if self.address == "auto":
                ray.init(num_cpus=self.n_workers or os.cpu_count() or 1, object_store_memory=300 * 2**20, **kwargs)
            else:
                ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"address: cannot connect to the Ray cluster at {self.address!r} ({exc})") from None
        self._connected = True

    def _disconnect(self) -> None:
        if self._connected and self._ray is not None:
            self._ray.shutdown()
            self._connected = False

    def _start_workers(self) -> None:
        ray = self._ray
        assert ray is not None
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 1:
            raise ClusterError(f"the Ray cluster at {self.address!r} has no CPU to run a worker on")
        n = self.n_workers or cpus
        self.report.workers = n
        remote = ray.remote(PhotoWorker).options(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        models = str(self.folder.models_manifest) if self.base is not None else None
        self.actors = [remote.remote(asdict(self.config), self.threads, models) for _ in range(n)]
        self.report.worker_pids |= set(self._get([a.pid.remote() for a in self.actors], "starting the workers"))

    def _stop_workers(self) -> None:
        ray = self._ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001  (already gone)
                pass
        self.actors = []

    def _get(self, refs, what: str):
        ray = self._ray
        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"{what}: no answer from the Ray cluster in {self.timeout:.0f} s") from None
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, D2RError):
                raise cause from None
            raise ClusterError(f"{what}: a worker failed: {exc}") from None
        except ray.exceptions.RayActorError as exc:
            raise ClusterError(f"{what}: a worker died and could not be restarted ({MAX_RESTARTS} restarts at most): {exc}") from None

    def _phase(self, kind: str, submit, check=None) -> None:
        """Run ``submit(actor, batch)`` for every batch whose ``kind`` shard is missing, keeping
        each worker busy with up to IN_FLIGHT batches; ``check(batch)`` after each one."""
        ray = self._ray
        done = self.folder.done(kind)
        if check is not None:
            for b in sorted(done):
                check(b)
        todo = deque(b for b in range(self.n_batches) if b not in done)
        self.report.reused[kind] = len(done)
        self.report.computed[kind] = 0
        photos_done = sum(len(self.batch(b)) for b in done)
        stage = "features" if kind == "features" else "aggregation" if self.codebook is None else "features + aggregation"
        self.progress.start(stage, photos_done, len(self.images))
        pending: dict = {}  # ref -> (batch, actor number)
        load = [0] * len(self.actors)
        while todo or pending:
            while todo and min(load) < IN_FLIGHT:
                a = load.index(min(load))
                b = todo.popleft()
                pending[submit(self.actors[a], b)] = (b, a)
                load[a] += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
            if not ready:
                raise ClusterError(f"{kind}: no batch finished in {self.timeout:.0f} s (is the Ray cluster alive?)")
            for ref in ready:
                b, a = pending.pop(ref)
                load[a] -= 1
                result = self._get(ref, f"{kind} of batch {b}")
                self.report.worker_pids.add(result["pid"])
                self.report.computed[kind] += 1
                if check is not None:
                    check(b)
                photos_done += result["photos"]
                self.progress.report(photos_done)

    def _check_photos(self, b: int) -> None:
        """Say which photos of batch ``b`` could not be read; raise for the first with on_error="raise"."""
        if self.codebook is None:
            errors = [(item["name"], item["error"]) for item in self.folder.photos(b)]
        else:
            errors = [(name, error) for name, error, _, _ in self.folder.read_aggregated(b)]
        for name, error in errors:
            if error is not None:
                if self.on_error == "raise":
                    raise ImageError(error)
                self.progress.end_line()
                log.warning("d2r: skipped %s: %s", name, error)

    def _codebook(self) -> Codebook:
        path = self.folder.codebook_path
        if path.is_file():  # a resumed build: trained (or given) before
            return Codebook.load(path)
        codebook = self.codebook
        if codebook is None:
            t0 = time.perf_counter()
            self.progress.start("codebook sample", 0, len(self.images))
            sample = DescriptorSample(len(self.images), CODEBOOK_SAMPLE, self.seed)
            n, dim = 0, 0
            for b in range(self.n_batches):
                seen, d = self.folder.sample_into(sample, [b])
                n, dim = n + seen, d or dim
                self.progress.report(n)
            t1 = time.perf_counter()
            self.progress.start("k-means", 0, CODEBOOK_ITERATIONS, unit="iterations")
            codebook = train_codebook(sample.array(dim), self.codebook_size, iterations=CODEBOOK_ITERATIONS,
                                      seed=self.seed, n_images=len(self.images),
                                      progress=lambda it, total, moved: self._kmeans_progress(it))
            self.report.phases["codebook sample"] = t1 - t0
            self.report.phases["k-means"] = time.perf_counter() - t1
        tmp = path.with_name(f".{path.name}.tmp")
        codebook.save(tmp)
        os.replace(tmp, path)
        return codebook

    def _kmeans_progress(self, iteration: int) -> None:
        self.progress.report(iteration)

    def _merge(self, codebook: Codebook) -> None:
        """Add every photo's aggregation to one index in the photos' order (after the base
        bundle's images when adding to one); save the bundle."""
        self.progress.start("merge", 0, len(self.images))
        skipped, added = {}, []
        n = 0
        if self.base is not None:
            engine = Engine.open(self.base, threads=self.threads)
            if engine.codebook is None or engine.codebook.checksum != codebook.checksum:
                engine.close()
                raise InputError(f"{self.base}: its codebook is not the one the photos were aggregated with; nothing was added")
        else:
            engine = Engine.create(self.config, codebook=codebook, threads=self.threads)
        with engine:
            for b in range(self.n_batches):
                for name, error, aggregated, packed in self.folder.read_aggregated(b):
                    if error is not None:
                        if self.on_error == "raise":
                            raise ImageError(error)
                        skipped[name] = error
                        engine.skipped[name] = error
                    else:
                        engine.add_aggregated(name, aggregated, self._meta(name), packed)
                        engine.skipped.pop(name, None)
                        added.append(name)
                    n += 1
                self.progress.report(n)
            if self.base is None or added:  # adding nothing writes no new version
                if self.base_checksum is not None:
                    check_unchanged(self.base, self.base_checksum)
                engine.save(self.output, protect=self.protect)
                self.report.version = engine.bundle_version
            self.report.n_images = len(engine.index) if engine.index is not None else 0
        self.report.skipped = dict(sorted(skipped.items()))
        self.report.added = added

    def _meta(self, name: str):
        return None if self.metadata is None else self.metadata.get(name)
