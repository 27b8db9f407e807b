"""The sync client: fetch the latest bundle of a collection, verified with The Update Framework
(TUF, ``tuf.ngclient``) against the collection's provisioned root, and swap it in atomically
(:class:`d2r.sync.destination.Destination`).

Device side: the standard library (urllib) plus ``tuf`` (and ``cryptography`` through it) for
the metadata: imported on use, with a clear error when missing. The bundle and delta formats
are :mod:`d2r.bundle`'s.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from .._files import sha256_file as _sha256_file
from ..bundle.archive import unpack_bundle
from ..bundle.delta import apply_delta
from ..bundle.folder import read_strict_info
from ..bundle.tuf import COLLECTION_NAME, SHA256_HEX, bundle_info_of, delta_target, target_url
from ..errors import ArchiveError, D2RError, InputError, SignatureError, StaleMetadataError, SyncError
from .destination import Destination, _crash_point, freshness, record_verified

_CHUNK = 1 << 20
DEFAULT_MAX_BUNDLE_BYTES = 8 * 1024**3
# Room a download must leave free on the destination's file system (bytes).
DISK_RESERVE = 64 * 1024**2


def plain_http_warning(url: str) -> str | None:
    """A warning for a server URL that is not https:// (tokens and bundles travel in clear)."""
    if urllib.parse.urlsplit(url).scheme.lower() == "https":
        return None
    return (f"warning: {url} is plain HTTP: the device token travels in clear and anyone on the network can read it "
            "(use https://, see docs/sync-protocol.md 'Running behind TLS')")


def _check_room(folder: Path, need: int, what: str) -> None:
    """Refuse to start a download of ``need`` bytes that the file system of ``folder`` cannot take."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need + DISK_RESERVE > free:
        raise SyncError(f"{what}: needs {need} bytes but {folder} has {free} bytes free "
                        f"(keeping {DISK_RESERVE} in reserve); nothing downloaded")


@dataclass
class SyncResult:
    """What one :meth:`SyncClient.sync` did: ``method`` is "none" (already current), "delta"
    or "full"; ``downloaded`` counts the bytes received in this run; ``verified_at`` is when
    the TUF metadata was last verified fresh (now, after a successful sync)."""

    version: int
    previous: int | None
    method: str
    downloaded: int = 0
    path: Path | None = None
    verified_at: str | None = None
    metadata_bytes: int = 0  # TUF metadata received in this run (not in ``downloaded``)


class _HTTPStatus(SyncError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _fetcher_class():
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    class _Fetcher(FetcherInterface):
        """tuf.ngclient's network access through urllib, with the device token on requests to the
        edge server only (never to a mirror)."""

        def __init__(self, token: str | None, token_prefix: str | None, timeout: float):
            self.token, self.prefix, self.timeout = token, token_prefix, timeout
            self.received = 0

        def _fetch(self, url: str):
            headers = {"User-Agent": "d2r-sync"}
            if self.token and self.prefix and url.startswith(self.prefix):
                headers["Authorization"] = f"Bearer {self.token}"
            try:
                resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                raise DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from None
            return self._chunks(resp)

        def _chunks(self, resp):
            with resp:
                for chunk in iter(lambda: resp.read(65536), b""):
                    self.received += len(chunk)
                    yield chunk

    return _Fetcher


class SyncClient:
    """Syncs one collection into a destination folder, trusting only the collection's TUF root.

    Args:
        server: edge server URL (``https://host:port``), or None with ``mirror``. Reports go here.
        collection: collection name. token: the device token (``d2r device add``).
        dest: destination folder. root: the collection's TUF root metadata provisioned on the
            device (path or bytes; ``d2r collection create`` writes it). Used on the first sync;
            after that the device's own copy (DEST/tuf/root.json, updated by key rotations).
        mirror: URL of a static copy of the collection's repository (``metadata/``, ``targets/``);
            default ``SERVER/tuf/COLLECTION``. The device token is not sent to a mirror.
        timeout: seconds per network operation. retries: attempts per download (each resumes
            with HTTP Range where the last stopped). prefer_delta: try a delta first.
        max_bundle_bytes: refuse a bundle whose signed length is larger (default 8 GiB). Every
            download is bounded by the length signed in TUF metadata, and a delta by the size of
            the full bundle too; neither starts unless the destination's file system has room.
    """

    def __init__(self, server: str | None, collection: str, token: str | None, dest, root=None, timeout: float = 30.0,
                 retries: int = 4, prefer_delta: bool = True, log=None, max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
                 mirror: str | None = None):
        if not isinstance(collection, str) or not COLLECTION_NAME.fullmatch(collection):
            raise InputError(f"collection: expected letters, digits, '.', '_' or '-' (at most 64), got {collection!r}")
        if not server and not mirror:
            raise InputError("a server URL or a mirror URL is required")
        self.server = server.rstrip("/") if server else None
        self.collection = collection
        self.token = token
        self.dest = Destination(dest)
        self.repo_url = (mirror.rstrip("/") if mirror else
                         f"{self.server}/tuf/{urllib.parse.quote(collection, safe='')}")
        self.root_bytes: bytes | None
        if isinstance(root, (bytes, bytearray)):
            self.root_bytes = bytes(root)
        elif root is not None:
            try:
                self.root_bytes = Path(root).read_bytes()
            except OSError as exc:
                raise InputError(f"{root}: cannot read the collection's TUF root ({exc.strerror or exc})") from None
        else:
            self.root_bytes = None
        self.timeout = timeout
        self.retries = max(int(retries), 1)
        self.prefer_delta = prefer_delta
        self.max_bundle_bytes = int(max_bundle_bytes)
        self.log = log or (lambda msg: None)
        self._updater: Any = None  # a tuf.ngclient.Updater once metadata is refreshed (tuf is imported on first use)
        self._verified_at: str | None = None  # when this run verified fresh TUF metadata
        for url in dict.fromkeys(u for u in (self.server, mirror) if u):
            warning = plain_http_warning(url)
            if warning and url == self.server:
                self.log(warning)

    # -- HTTP ---------------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"{self.server}/api/v1/collections/{urllib.parse.quote(self.collection, safe='')}{path}"

    def _request(self, url: str, headers=None, data=None, method=None):
        h = {"User-Agent": "d2r-sync"}
        if self.token and self.server and url.startswith(self.server + "/"):
            h["Authorization"] = f"Bearer {self.token}"
        h.update(headers or {})
        req = urllib.request.Request(url, data=data, headers=h, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}").get("error", "")
            except (ValueError, AttributeError):
                body = ""
            exc.close()
            what = {401: "the token is wrong or revoked", 403: "the token may not read this collection",
                    404: "not found"}.get(exc.code, body or exc.reason)
            raise _HTTPStatus(exc.code, f"{url}: HTTP {exc.code}: {what}" + (f" ({body})" if body and body != what else "")) from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            raise SyncError(f"{url}: server unreachable ({getattr(exc, 'reason', exc)})") from None

    # -- TUF ------------------------------------------------------------------------------------------
    def _new_updater(self):
        try:
            from tuf.ngclient import Updater, UpdaterConfig
        except ImportError:  # pragma: no cover - depends on the installation
            raise SyncError("syncing needs The Update Framework's client: pip install tuf") from None
        meta = self.dest.tuf
        meta.mkdir(parents=True, exist_ok=True)
        bootstrap = None
        if not self.dest.has_trusted_root():
            if self.root_bytes is None:
                raise InputError(f"{self.dest.root}: no trusted TUF root yet: provision the collection's root metadata "
                                 "(root: COLLECTION.root.json, written by `d2r collection create`)")
            bootstrap = self.root_bytes
        fetcher = _fetcher_class()(self.token, (self.server + "/") if self.server else None, self.timeout)
        self._fetcher = fetcher
        config = UpdaterConfig(app_user_agent="d2r-sync", targets_max_length=4_000_000)
        try:
            return Updater(str(meta), self.repo_url + "/metadata/", None, self.repo_url + "/targets/", fetcher, config,
                           bootstrap=bootstrap)
        except Exception as exc:  # noqa: BLE001 - a bad provisioned root
            raise InputError(f"the provisioned TUF root is not valid root metadata ({type(exc).__name__}: {exc})") from None

    def _tuf_error(self, exc, cur_version):
        from tuf.api import exceptions as tx

        if isinstance(exc, tx.DownloadHTTPError):
            what = {401: "the token is wrong or revoked", 403: "the token may not read this collection"}.get(exc.status_code, "")
            return _HTTPStatus(exc.status_code, f"{self.repo_url}: HTTP {exc.status_code}{': ' + what if what else ''} ({exc})")
        if isinstance(exc, tx.ExpiredMetadataError):
            fr = freshness(self.dest.root)
            stale = fr["stale_seconds"]
            ago = f"{stale:.0f} s ago" if stale is not None else "never"
            return StaleMetadataError(
                f"{self.repo_url}: the repository's TUF metadata has expired ({exc}); a freeze or a server that stopped "
                f"re-signing. Keeping the active version {cur_version if cur_version is not None else '(none)'}; "
                f"last verified fresh {ago}", cur_version, stale)
        if isinstance(exc, tx.BadVersionNumberError):
            return SignatureError(f"{self.repo_url}: rollback refused: the repository offers older TUF metadata than this "
                                  f"device has already seen ({exc}); active bundle kept")
        if isinstance(exc, tx.RepositoryError):
            return SignatureError(f"{self.repo_url}: TUF metadata refused ({type(exc).__name__}: {exc}); active bundle kept")
        if isinstance(exc, tx.DownloadError):
            cause = exc.__cause__ or exc
            return SyncError(f"{self.repo_url}: repository unreachable ({type(cause).__name__}: {cause})")
        return None

    def _refresh(self, cur_version):
        from tuf.api.metadata import Metadata

        self._updater = self._new_updater()
        try:
            self._updater.refresh()
        except Exception as exc:  # noqa: BLE001 - mapped to d2r errors below
            mapped = self._tuf_error(exc, cur_version)
            if mapped is None:
                raise
            raise mapped from None
        # The targets metadata verified by refresh(), as ngclient keeps it.
        trusted = Metadata.from_file(str(self.dest.tuf / "targets.json"))
        expires = []
        for role in ("timestamp", "snapshot", "targets", "root"):
            try:
                expires.append(Metadata.from_file(str(self.dest.tuf / f"{role}.json")).signed.expires)
            except (OSError, ValueError):
                pass
        return trusted, min(expires) if expires else None

    def latest(self, cur_version=None) -> dict:
        """The newest bundle the collection's verified TUF targets offer: {version, target,
        archive_sha256, archive_size, bundle_checksum, n_images}. Refreshes the metadata."""
        trusted, expires = self._refresh(cur_version)
        best = None
        for t in trusted.signed.targets.values():
            try:
                info = bundle_info_of(t)
            except InputError as exc:
                raise SignatureError(f"{self.repo_url}: signed targets hold a malformed bundle target ({exc})") from None
            if best is None or info["version"] > best["version"]:
                best = dict(info, target=t)
        self._verified_at = record_verified(self.dest.root, expires)
        if best is None:
            raise SyncError(f"collection {self.collection!r} has no published version")
        return {"version": best["version"], "target": best["target"], "archive_sha256": best["sha256"],
                "archive_size": best["length"], "bundle_checksum": best["bundle_checksum"], "n_images": best["n_images"]}

    def _download(self, url: str, part: Path, expect_sha: str | None, max_size: int | None = None) -> tuple[Path, int, str]:
        """Download ``url`` to ``part``, resuming with Range after a dropped connection (within
        this call and across runs), then check the sha256. Stops a response that grows past
        ``max_size`` bytes (the length signed in TUF metadata). Returns (path, bytes received, sha)."""
        received = 0
        last_error = None
        for attempt in range(self.retries):
            have = part.stat().st_size if part.exists() else 0
            if max_size is not None and have > max_size:
                part.unlink()
                have = 0
            headers = {}
            if have:
                headers["Range"] = f"bytes={have}-"
                if expect_sha:
                    headers["If-Range"] = f'"{expect_sha}"'
            try:
                resp = self._request(url, headers)
            except _HTTPStatus as exc:
                if exc.status == 416 and have:  # nothing left to send: the file may be complete
                    break
                raise
            except SyncError as exc:
                last_error = exc
                time.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            try:
                with resp:
                    mode = "ab" if resp.status == 206 else "wb"
                    with open(part, mode) as fh:
                        for chunk in iter(functools.partial(resp.read, _CHUNK), b""):
                            fh.write(chunk)
                            received += len(chunk)
                            _crash_point("download-chunk")
                            if max_size is not None and fh.tell() > max_size:
                                fh.close()
                                part.unlink(missing_ok=True)
                                raise SyncError(f"{url}: the server sends more than the signed {max_size} bytes; discarded")
                        fh.flush()
                        os.fsync(fh.fileno())
                    length = resp.headers.get("Content-Length")
                    if length is not None and resp.status in (200, 206):
                        expected_end = int(length) + (have if resp.status == 206 else 0)
                        if part.stat().st_size < expected_end:
                            raise HTTPException(f"connection closed after {part.stat().st_size} of {expected_end} bytes")
                last_error = None
                break
            except (OSError, HTTPException, ValueError) as exc:
                last_error = SyncError(f"{url}: download interrupted ({exc}); resuming")
                self.log(str(last_error))
                time.sleep(min(0.2 * 2**attempt, 5.0))
        if last_error is not None:
            raise SyncError(f"{url}: download failed after {self.retries} attempts ({last_error})")
        sha = _sha256_file(part)
        if expect_sha and sha != expect_sha:
            part.unlink(missing_ok=True)  # start over next time: resuming a corrupt file cannot help
            raise SyncError(f"{url}: downloaded data is corrupt (sha256 {sha[:12]}... instead of the signed "
                            f"{expect_sha[:12]}...); discarded")
        return part, received, sha

    def _target_url(self, path: str, sha: str) -> str:
        return target_url(self.repo_url + "/targets", path, sha)

    # -- one sync -------------------------------------------------------------------------------------
    def sync(self) -> SyncResult:
        """Bring ``dest`` to the latest version (delta if possible, else full). Raises
        :class:`SyncError` (the active bundle unchanged) on any failure;
        :class:`StaleMetadataError` when the repository's metadata has expired."""
        with self.dest.lock():
            try:
                return self._sync()
            except StaleMetadataError as exc:
                if exc.version is not None:
                    self._report(exc.version, "stale", 0, int(exc.stale_seconds) if exc.stale_seconds is not None else None)
                raise

    def _sync(self) -> SyncResult:
        dest = self.dest
        dest.prepare()
        cur_dir = dest.current
        cur = read_strict_info(cur_dir) if cur_dir is not None else None
        self._verified_at = None
        latest = self.latest(int(cur["version"]) if cur else None)
        version = int(latest["version"])
        if cur is not None:
            if cur["checksum"] == latest["bundle_checksum"]:
                return SyncResult(int(cur["version"]), None, "none", 0, cur_dir, self._verified_at, self._fetcher.received)
            if version <= int(cur["version"]):
                raise SyncError(f"the repository offers version {version}, not newer than the active {cur['version']}: "
                                "refused (use Destination.rollback() to go back on purpose)")
        size = int(latest["archive_size"])
        if size > self.max_bundle_bytes:
            raise SyncError(f"version {version}: the signed bundle has {size} bytes, over this device's limit of "
                            f"{self.max_bundle_bytes} (max_bundle_bytes); nothing downloaded")
        downloaded = 0
        staged = None
        method = "full"
        if cur is not None and cur_dir is not None and self.prefer_delta:
            try:
                staged, n = self._fetch_delta(cur_dir, int(cur["version"]), version, size)
                if staged is not None:
                    downloaded += n
                    method = "delta"
            except _HTTPStatus as exc:
                if exc.status in (401, 403):
                    raise
                self.log(f"no delta ({exc}); downloading the full bundle")
            except (SyncError, ArchiveError, D2RError) as exc:
                self.log(f"delta rejected ({exc}); downloading the full bundle")
                downloaded += getattr(exc, "downloaded", 0)
        if staged is None:
            part = dest.staging / f"bundle-{latest['archive_sha256']}.part"
            _check_room(dest.staging, size - (part.stat().st_size if part.exists() else 0), f"version {version}")
            part, n, _ = self._download(self._target_url(latest["target"].path, latest["archive_sha256"]), part,
                                        latest["archive_sha256"], size)
            downloaded += n
            _crash_point("downloaded")
            staged = dest.staging / f"unpack-{version}"
            try:
                unpack_bundle(part, staged)
            except D2RError as exc:
                part.unlink(missing_ok=True)
                raise SyncError(f"version {version}: the bundle archive is unusable ({exc}); active bundle kept") from exc
            part.unlink(missing_ok=True)
        info = read_strict_info(staged)
        if info["checksum"] != latest["bundle_checksum"] or int(info["version"]) != version:
            raise SignatureError(f"version {version}: the bundle built does not match the signed bundle_checksum; "
                                 "active bundle kept")
        _crash_point("verified")
        final = dest.install(staged, version)
        dest.prune()
        for p in dest.staging.glob("*.part"):  # partial downloads of versions no longer wanted
            p.unlink(missing_ok=True)
        self._report(version, method, downloaded)
        return SyncResult(version, int(cur["version"]) if cur else None, method, downloaded, final, self._verified_at,
                          self._fetcher.received)

    def _fetch_delta(self, cur_dir: Path, from_version: int, to_version: int, max_size: int):
        """Download and apply the delta if the signed metadata lists one (role "deltas"); None
        otherwise. Bounded by its signed length and by the size of the full bundle."""
        path = delta_target(from_version, to_version)
        try:
            target = self._updater.get_targetinfo(path)
        except Exception as exc:  # noqa: BLE001 - TUF errors of the delegated role
            mapped = self._tuf_error(exc, from_version)
            raise (mapped or SyncError(f"{path}: {exc}")) from None
        if target is None:
            self.log(f"no delta from version {from_version} to {to_version}; downloading the full bundle")
            return None, 0
        sha = target.hashes.get("sha256", "")
        if not SHA256_HEX.match(sha):
            raise SyncError(f"{path}: no sha256 in its signed metadata")
        if target.length > max_size:
            raise SyncError(f"{path}: a delta of {target.length} bytes is not smaller than the full bundle ({max_size} bytes)")
        part = self.dest.staging / f"delta-{from_version}-{to_version}-{sha}.part"
        _check_room(self.dest.staging, target.length, path)
        part, n, _ = self._download(self._target_url(path, sha), part, sha, target.length)
        staged = self.dest.staging / f"delta-unpack-{to_version}"
        try:
            apply_delta(cur_dir, part, staged)
        except D2RError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            part.unlink(missing_ok=True)
            exc.downloaded = n  # type: ignore[attr-defined]  # read back with getattr by _sync
            raise
        part.unlink(missing_ok=True)
        return staged, n

    def _report(self, version: int, method: str, downloaded: int, stale_seconds: int | None = None) -> None:
        if not self.server:
            return
        body = {"version": version, "method": method, "bytes": downloaded}
        if stale_seconds is not None:
            body["stale_seconds"] = stale_seconds
        try:
            self._request(self._url("/sync-report"), {"Content-Type": "application/json"}, data=json.dumps(body).encode(),
                          method="POST").close()
        except SyncError as exc:  # the swap is done; a lost report only delays the status page
            self.log(f"sync report not delivered ({exc})")
