"""Image-text pairs fetched from URL tables (img2dataset / LAION-style parquet or JSONL metadata).

:func:`read_url_table` loads the metadata: a ``url`` column (``URL`` too), an optional caption
(``caption`` or img2dataset's ``TEXT``) and optional ``width``/``height``/``similarity`` columns used for
filtering. :class:`UrlImages` is the :class:`~fastdit.data.streaming.SampleSource` over such a table:
its items are chunks of rows (``"<file>#rows=a:b"``), and reading a chunk fetches the images with a
thread pool through :class:`~fastdit.data.fetch.SafeFetcher` (public addresses only, deadline, byte cap)
and a per-process :class:`~fastdit.data.ram_cache.RamCache`, decodes them with
:func:`~fastdit.data.images.decode_image` (decompression bombs refused from the header) and crops them
with :func:`~fastdit.data.images.to_training_array`. Failures become ``Skip("fetch: <reason>")`` or
``Skip("image: <reason>")``, so ``StreamingDataset.skip_counts()`` tells dead links from bad images.

Wrap it in :class:`~fastdit.data.streaming.StreamingDataset` for the trainer::

    source = UrlImages("laion/part-*.parquet", size=256, min_width=256, min_height=256)
    data = StreamingDataset(source, batch_size=64, seed=0, rank=rank, world_size=world, num_workers=4)

Choose ``chunk_size`` so that there are at least ``world_size * num_workers`` chunks: with fewer items
than readers the dataset splits by sample and every reader walks every chunk (it only *fetches* its own
rows, but the chunk order is shared).

Throughput and dead links
-------------------------
Samples come out strictly in row order (the stream is deterministic and positions count skips), so a row
whose server stalls holds the reader until the fetch deadline (``FetchPolicy.deadline_s``). To keep going
meanwhile, a reader submits up to ``window`` rows *ahead* of the one it hands out, run by ``concurrency``
threads (fetching is I/O-bound; Pillow decodes outside the GIL). With a stall in every window the rate
of one reader is at most about ``window / deadline_s`` rows/s, so size the window as
``rows/s wanted x deadline_s`` (e.g. 256 rows for ~250 rows/s at a 1 s deadline; a 10 s internet deadline
needs ~2500 rows or several workers) and keep ``concurrency`` above the stalls in flight
(``window x stalled fraction``) plus the cores' worth of decoding. Finished rows waiting for an earlier
one are held decoded (``3 x S x S`` bytes each: 196 KB at S=256), so memory per reader is about
``window x 3 x S x S``.

The window does not cross items: ``StreamingDataset`` asks for one item at a time, so at the end of every
chunk the window drains and the next chunk starts empty (up to one deadline lost per chunk when a stall
sits near the end). Keep ``chunk_size`` several times the window (default 1024 rows = 4 windows).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import itertools
import json
import os
import socket
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from fastdit.data.base import derive_seed
from fastdit.data.fetch import FetchFailed, FetchPolicy, Resolver, SafeFetcher
from fastdit.data.images import ImageRejected, decode_image, to_training_array
from fastdit.data.ram_cache import RamCache
from fastdit.data.streaming import Sample, SampleSource, Skip

TABLE_EXTENSIONS = (".parquet", ".jsonl", ".json")
# Column names, matched case-insensitively; the first present wins.
URL_COLUMNS = ("url",)
CAPTION_COLUMNS = ("caption", "text")
WIDTH_COLUMNS = ("width",)
HEIGHT_COLUMNS = ("height",)
SIMILARITY_COLUMNS = ("similarity",)


@dataclasses.dataclass
class UrlFile:
    """The usable rows of one metadata file, as columns.

    ``urls[i]``/``captions[i]`` is row ``i`` *after* filtering (chunk ranges count these rows).
    ``captions`` is None when the file has no caption column. ``rows_in_file``: rows read;
    ``bad_rows``: rows without a usable URL (and JSONL lines that are not JSON objects);
    ``filtered_out``: rows removed by the width/height/similarity filters.
    """

    path: str
    urls: List[str]
    captions: Optional[List[str]]
    rows_in_file: int = 0
    bad_rows: int = 0
    filtered_out: int = 0

    def __len__(self) -> int:
        return len(self.urls)


@dataclasses.dataclass
class UrlTable:
    """URL metadata of one or more files (:class:`UrlFile` each, in sorted path order)."""

    files: List[UrlFile]

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    @property
    def has_captions(self) -> bool:
        """True when any file has a caption column (rows of files without one get ``""``)."""
        return any(f.captions is not None for f in self.files)

    @property
    def bad_rows(self) -> int:
        return sum(f.bad_rows for f in self.files)

    @property
    def filtered_out(self) -> int:
        return sum(f.filtered_out for f in self.files)

    def row(self, file_index: int, row: int) -> Tuple[str, str]:
        """(url, caption) of a row; caption ``""`` when the file has none."""
        f = self.files[file_index]
        return f.urls[row], (f.captions[row] if f.captions is not None else "")


# =====================================================================================================
# Reading the metadata
# =====================================================================================================
def match_table_files(path_or_glob: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    """The metadata files named by a path, a directory (its ``*.parquet``/``*.jsonl``/``*.json``), a glob
    pattern or a list of those; sorted, without duplicates. ``ValueError`` naming the pattern when
    nothing matches or a matched file has another extension."""
    patterns = [path_or_glob] if isinstance(path_or_glob, (str, os.PathLike)) else list(path_or_glob)
    if not patterns:
        raise ValueError("read_url_table: no path or pattern given")
    found: List[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            matches = [os.path.join(pattern, n) for n in os.listdir(pattern) if n.lower().endswith(TABLE_EXTENSIONS)]
        elif glob.has_magic(pattern):
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise ValueError(f"read_url_table: no file matches {pattern!r}")
        for path in sorted(matches):
            if not path.lower().endswith(TABLE_EXTENSIONS):
                raise ValueError(f"read_url_table: {path} is neither parquet nor JSONL "
                                 f"(extensions {', '.join(TABLE_EXTENSIONS)})")
            found.append(path)
    return list(dict.fromkeys(found))


def read_url_table(path_or_glob, *, min_width: Optional[int] = None, min_height: Optional[int] = None,
                   min_similarity: Optional[float] = None) -> UrlTable:
    """Load URL metadata from parquet (``pyarrow.parquet``) and/or JSONL files (one JSON object per line).

    Required column ``url`` (or ``URL``); a file without it is a ``ValueError`` naming the file and the
    columns it has. Optional ``caption`` / ``TEXT``. The ``min_*`` filters apply to files that have the
    column (``width``/``WIDTH``, ...); there a row whose value is missing or not a number fails the
    filter. JSONL lines that are not JSON objects or have no URL string are skipped and counted
    (``UrlFile.bad_rows``), as are parquet rows with a null or empty URL.
    """
    filters = {"width": min_width, "height": min_height, "similarity": min_similarity}
    files = []
    for path in match_table_files(path_or_glob):
        if path.lower().endswith(".parquet"):
            files.append(_read_parquet(path, filters))
        else:
            files.append(_read_jsonl(path, filters))
    return UrlTable(files)


def _find_column(names: Sequence[str], wanted: Sequence[str]) -> Optional[str]:
    lower = {n.lower(): n for n in reversed(list(names))}  # first spelling wins on a case clash
    for w in wanted:
        if w in lower:
            return lower[w]
    return None


def _passes(value: Any, minimum: Optional[float]) -> bool:
    if minimum is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= minimum


_FILTER_COLUMNS = {"width": WIDTH_COLUMNS, "height": HEIGHT_COLUMNS, "similarity": SIMILARITY_COLUMNS}


def _read_parquet(path: str, filters: Dict[str, Optional[float]]) -> UrlFile:
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"read_url_table: cannot read {path} as parquet: {err}") from None
    url_col = _find_column(names, URL_COLUMNS)
    if url_col is None:
        raise ValueError(f"read_url_table: {path} has no 'url' column; its columns are {names}")
    caption_col = _find_column(names, CAPTION_COLUMNS)
    filter_cols = {key: _find_column(names, _FILTER_COLUMNS[key]) for key, m in filters.items() if m is not None}
    columns = [c for c in dict.fromkeys([url_col, caption_col, *filter_cols.values()]) if c is not None]
    table = pq.read_table(path, columns=columns)
    urls = table.column(url_col).to_pylist()
    captions = table.column(caption_col).to_pylist() if caption_col else None
    values = {key: table.column(col).to_pylist() for key, col in filter_cols.items() if col is not None}
    return _keep_rows(path, urls, captions, values, filters)


def _read_jsonl(path: str, filters: Dict[str, Optional[float]]) -> UrlFile:
    rows, bad, keys_seen = [], 0, {}
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(obj, dict):
                bad += 1
                continue
            for key in obj:
                keys_seen.setdefault(key, None)
            rows.append(obj)
    names = list(keys_seen)
    url_col = _find_column(names, URL_COLUMNS)
    if rows and url_col is None:
        raise ValueError(f"read_url_table: {path} has no 'url' field in any line; its fields are {names}")
    caption_col = _find_column(names, CAPTION_COLUMNS)
    urls = [r.get(url_col) for r in rows]
    captions = [r.get(caption_col) for r in rows] if caption_col else None
    values = {}
    for key, minimum in filters.items():
        col = _find_column(names, _FILTER_COLUMNS[key]) if minimum is not None else None
        if col is not None:
            values[key] = [r.get(col) for r in rows]
    out = _keep_rows(path, urls, captions, values, filters)
    out.rows_in_file += bad
    out.bad_rows += bad
    return out


def _keep_rows(path: str, urls: List[Any], captions: Optional[List[Any]], values: Dict[str, List[Any]],
               filters: Dict[str, Optional[float]]) -> UrlFile:
    out = UrlFile(path, [], [] if captions is not None else None, rows_in_file=len(urls))
    for i, url in enumerate(urls):
        if not isinstance(url, str) or not url.strip():
            out.bad_rows += 1
            continue
        if not all(_passes(column[i], filters[key]) for key, column in values.items()):
            out.filtered_out += 1
            continue
        out.urls.append(url.strip())
        if captions is not None:
            caption = captions[i]
            out.captions.append(caption if isinstance(caption, str) else ("" if caption is None else str(caption)))
    return out


# =====================================================================================================
# The sample source
# =====================================================================================================
REASON_FETCH_PREFIX = "fetch: "
REASON_IMAGE_PREFIX = "image: "


class UrlImages(SampleSource):
    """Images (and captions) fetched from a URL table, as a :class:`SampleSource` named ``"urls"``.

    Args:
        table: a :class:`UrlTable` or what :func:`read_url_table` takes (path, directory, glob, list).
        size: side of the square training crop S (samples are ``{"image": uint8 (3, S, S)}``).
        chunk_size: rows per item (``"<file>#rows=a:b"``); keep it several times ``window`` (see the
            module docstring: the look-ahead drains at every item boundary).
        concurrency: fetch threads per reading process (fetches in flight at once; I/O-bound, so cheap).
        window: rows submitted ahead of the consumer (look-ahead), at least ``concurrency`` in effect;
            results still come out in row order. Bounds the rate to ~``window / deadline_s`` rows/s per
            reader when stalled servers are common, and memory to ~``window`` decoded crops.
        seed: seeds the horizontal flips, drawn per (seed, epoch, file, row) when ``random_flip``.
        policy: the :class:`FetchPolicy` (deadline, byte cap, allowed networks, ...).
        cache_bytes: per-process :class:`RamCache` of fetched bytes (0 disables it).
        max_pixels, min_side: passed to :func:`decode_image`.
        resolver: ``getaddrinfo``-like name resolver of the fetcher (tests pass a stub).
        min_width, min_height, min_similarity: row filters, when ``table`` is read here.

    Samples: ``{"image": uint8 (3, S, S)}`` plus ``"caption": str`` when the table has captions. A row
    that fails yields ``Skip("fetch: <reason>")`` (reasons of :mod:`fastdit.data.fetch`) or
    ``Skip("image: <reason>")`` (reasons of :mod:`fastdit.data.images`).

    Per process: :meth:`worker_init` (called by ``StreamingDataset`` in each reading process) makes the
    fetcher and the cache; a process that reads without it (or a forked child) makes its own on first use.
    """

    name = "urls"

    def __init__(self, table: Union[UrlTable, str, os.PathLike, Sequence[str]], *, size: int,
                 chunk_size: int = 1024, concurrency: int = 64, window: int = 256, seed: int = 0,
                 random_flip: bool = True,
                 policy: Optional[FetchPolicy] = None, cache_bytes: int = 256 * 1024 * 1024,
                 max_pixels: int = 64_000_000, min_side: int = 1, resolver: Resolver = socket.getaddrinfo,
                 min_width: Optional[int] = None, min_height: Optional[int] = None,
                 min_similarity: Optional[float] = None):
        if isinstance(table, UrlTable):
            if (min_width, min_height, min_similarity) != (None, None, None):
                raise ValueError("UrlImages: min_width/min_height/min_similarity apply when reading the table; "
                                 "pass them to read_url_table for a UrlTable")
        else:
            table = read_url_table(table, min_width=min_width, min_height=min_height,
                                   min_similarity=min_similarity)
        for name, value, low in (("size", size, 1), ("chunk_size", chunk_size, 1),
                                 ("concurrency", concurrency, 1), ("window", window, 1), ("seed", seed, 0),
                                 ("cache_bytes", cache_bytes, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"UrlImages: {name} must be an int >= {low}, got {value!r}")
        if len(table) == 0:
            raise ValueError(f"UrlImages: no usable rows in {[f.path for f in table.files]} "
                             f"({table.bad_rows} bad, {table.filtered_out} filtered out)")
        self.table, self.size, self.chunk_size, self.concurrency = table, size, chunk_size, concurrency
        self.window = max(window, concurrency)  # fewer rows ahead than threads would leave threads idle
        self.seed, self.random_flip = seed, bool(random_flip)
        self.policy = policy if policy is not None else FetchPolicy()
        self.cache_bytes, self.max_pixels, self.min_side = cache_bytes, max_pixels, min_side
        self.resolver = resolver
        self._file_index = {f.path: i for i, f in enumerate(table.files)}
        self._items = [f"{f.path}#rows={a}:{min(a + chunk_size, len(f))}"
                       for f in table.files for a in range(0, len(f), chunk_size)]
        self._pid: Optional[int] = None
        self._fetcher: Optional[SafeFetcher] = None
        self._cache: Optional[RamCache] = None

    # ---- SampleSource ---------------------------------------------------------------------------------
    def items(self) -> List[str]:
        return list(self._items)

    def worker_init(self) -> None:
        """Make this process's fetcher (connection pools) and cache."""
        if self._fetcher is not None and self._pid == os.getpid():
            self._fetcher.close()
        self._fetcher = SafeFetcher(self.policy, resolver=self.resolver)
        self._cache = RamCache(self.cache_bytes)
        self._pid = os.getpid()

    @property
    def cache(self) -> Optional[RamCache]:
        """This process's cache (None before the first read / ``worker_init``)."""
        return self._cache if self._pid == os.getpid() else None

    def read(self, item: str, start: int) -> Iterator[Union[Sample, Skip]]:
        return self.read_positions(item, start, 1, 0)

    def read_positions(self, item: str, start: int, stride: int = 1,
                       epoch: int = 0) -> Iterator[Union[Sample, Skip]]:
        """Rows ``a + start, a + start + stride, ...`` of the chunk, yielded in row order; up to ``window``
        of them are submitted ahead of the one handed out and fetched by ``concurrency`` threads. Only
        these rows are fetched. Closing (or dropping) the generator early cancels the fetches not yet
        started; running ones end by the fetch deadline, and then their threads exit."""
        file_index, first, end = self._parse_item(item)
        if not isinstance(start, int) or start < 0 or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"UrlImages.read: bad start={start!r} / stride={stride!r} for {item!r}")
        rows = range(first + start, end, stride)
        return self._read_rows(file_index, rows, epoch)

    # ---- internals ------------------------------------------------------------------------------------
    def _parse_item(self, item: str) -> Tuple[int, int, int]:
        path, sep, span = item.rpartition("#rows=")
        try:
            first, end = (int(x) for x in span.split(":"))
        except ValueError:
            first = end = -1
        rows_in_file = len(self.table.files[self._file_index[path]]) if path in self._file_index else -1
        if not sep or not 0 <= first <= end <= rows_in_file:
            raise ValueError(f"UrlImages: {item!r} is not one of this source's items "
                             f"(expected '<file>#rows=a:b' of {len(self._items)} items)")
        return self._file_index[path], first, end

    def _ensure_ready(self) -> Tuple[SafeFetcher, RamCache]:
        if self._fetcher is None or self._cache is None or self._pid != os.getpid():
            self.worker_init()
        return self._fetcher, self._cache

    def _read_rows(self, file_index: int, rows: range, epoch: int) -> Iterator[Union[Sample, Skip]]:
        if len(rows) == 0:
            return
        fetcher, cache = self._ensure_ready()
        # The executor's queue is FIFO, so rows start in row order; `pending` holds the submitted rows
        # (at most `window`), the oldest first. Threads are made on demand, never more than rows.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.concurrency, len(rows)),
                                                     thread_name_prefix="fastdit-urls")
        pending: "collections.deque[concurrent.futures.Future]" = collections.deque()
        todo = iter(rows)
        try:
            for row in itertools.islice(todo, self.window):
                pending.append(pool.submit(self._load, fetcher, cache, file_index, row, epoch))
            while pending:
                result = pending.popleft().result()
                row = next(todo, None)
                if row is not None:  # keep the window full while the consumer works
                    pending.append(pool.submit(self._load, fetcher, cache, file_index, row, epoch))
                yield result
        finally:
            # Closed early (or an error): queued rows never start; running fetches end by the deadline
            # and their threads then exit (shutdown without waiting, so close() never blocks).
            for future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _flip(self, epoch: int, file_index: int, row: int) -> bool:
        return self.random_flip and bool(derive_seed(self.seed, epoch, file_index, row) & 1)

    def _load(self, fetcher: SafeFetcher, cache: RamCache, file_index: int, row: int,
              epoch: int) -> Union[Sample, Skip]:
        """Fetch (or take from the cache), decode and crop one row."""
        url, caption = self.table.row(file_index, row)
        data = cache.get(url)
        from_cache = data is not None
        if data is None:
            try:
                data = fetcher.fetch(url)
            except FetchFailed as err:
                return Skip(REASON_FETCH_PREFIX + err.reason)
        try:
            img = decode_image(data, max_pixels=self.max_pixels, min_side=self.min_side, draft_size=self.size)
            image = to_training_array(img, self.size, flip=self._flip(epoch, file_index, row))
        except ImageRejected as err:
            return Skip(REASON_IMAGE_PREFIX + err.reason)
        if not from_cache:
            cache.put(url, data)  # only images that decode: a bad one is not worth the memory
        sample: Sample = {"image": image}
        if self.table.has_captions:
            sample["caption"] = caption
        return sample

    # ---- pickling (DataLoader workers under "spawn") ------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pid=None, _fetcher=None, _cache=None)  # per process; rebuilt by worker_init
        return state

    def __repr__(self) -> str:
        return (f"UrlImages({len(self.table)} rows in {len(self.table.files)} files, {len(self._items)} items, "
                f"size={self.size}, chunk_size={self.chunk_size}, concurrency={self.concurrency}, "
                f"window={self.window})")
