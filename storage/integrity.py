"""The DuckDB file-integrity checks run when a database file is opened.

- a write-ahead log (`<db>.wal`) that DuckDB cannot replay, or would silently drop part of, is never deleted: it is
  renamed to `<db>.wal.quarantined-<UTC time>` and the entries before the damage are replayed from a copy; the
  warning is logged and returned to the caller (`connect`);
- every block of the file is checked against its checksum before the database is used (`verify_file`: one
  sequential read of the file, vectorised); a damaged block that holds table data or catalog metadata (or, with no
  free blocks, an index) raises StorageError telling the user to restore a backup, instead of failing later on
  some query.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from datetime import datetime, timezone

import duckdb
import numpy as np

from .errors import RESTORE_ADVICE, StorageError, short

MEMORY = ":memory:"

log = logging.getLogger("rlhf_studio.storage")


# ------------------------------------------------------------------------------------------ write-ahead log
def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ValueError("truncated varint")
        x = b[i]
        i += 1
        value |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return value, i


_WAL_VERSION_ENTRY = 98  # DuckDB's WALType::WAL_VERSION


def inspect_wal(fh, size: int) -> tuple[str, int]:
    """Walk the framing of a DuckDB (2.x, unencrypted) write-ahead log, open as `fh`, without replaying it.

    Returns (state, offset): "ok" (the entries end exactly at the end of the file), "torn" (the entry at `offset`
    runs past the end: DuckDB replays the entries before it and silently drops the rest) or "garbage" (not a
    DuckDB WAL at all: DuckDB would silently delete it). "unknown": a layout this code does not know (an older or
    newer WAL version, an encrypted one): left to DuckDB.
    The layout: a version entry written raw (binary-serialised fields 100 wal_type=98, 101 version, 102 database
    id, 103 checkpoint iteration, then 0xFFFF), then entries framed as [u64 size][u64 checksum][payload].
    Only the 16-byte frame headers are read, so a large log costs one seek per entry.
    """
    fh.seek(0)
    head = fh.read(4096)
    if len(head) < 2 or head[:2] != b"\x64\x00":
        return "garbage", 0
    try:
        wal_type, i = _varint(head, 2)
        if wal_type != _WAL_VERSION_ENTRY:
            return "unknown", 0  # version-1 WALs start with a data entry
        if head[i:i + 2] != b"\x65\x00":
            return "garbage", 0
        version, i = _varint(head, i + 2)
        if version != 2:
            return "unknown", 0
        while head[i:i + 2] != b"\xff\xff":
            field = int.from_bytes(head[i:i + 2], "little")
            i += 2
            if field == 102:        # database identifier: a list of varint bytes
                n, i = _varint(head, i)
                if n > 64:
                    return "garbage", 0
                for _ in range(n):
                    _, i = _varint(head, i)
            elif field == 103:      # checkpoint iteration
                _, i = _varint(head, i)
            else:
                return "garbage", 0
            if i >= len(head):
                return "garbage", 0
        i += 2
    except ValueError:
        return "garbage", 0
    while i < size:
        if i + 16 > size:
            return "torn", i
        fh.seek(i)
        frame = fh.read(16)
        entry = struct.unpack_from("<Q", frame, 0)[0]
        if entry > size - i - 16:
            return "torn", i
        i += 16 + entry
    return "ok", i


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def quarantine_wal(path: str, keep: int, reason: str) -> tuple[str, int]:
    """Move `<path>.wal` aside to `<path>.wal.quarantined-<UTC time>` (never deleted) and, when keep > 0, put a
    copy of its first `keep` bytes (the entries before the damage) back as `<path>.wal` for DuckDB to replay.
    Returns the warning (also logged) and the number of bytes that were not replayed."""
    wal = path + ".wal"
    target = f"{wal}.quarantined-{_utc_stamp()}"
    while os.path.exists(target):
        target = f"{wal}.quarantined-{_utc_stamp()}"
    os.rename(wal, target)
    kept = 0
    if keep > 0:
        with open(target, "rb") as src, open(wal, "xb") as dst:
            remaining = keep
            while remaining:
                chunk = src.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                dst.write(chunk)
                remaining -= len(chunk)
                kept += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    _fsync_dir(os.path.dirname(wal) or ".")
    size = os.path.getsize(target)
    tail = (f"its first {kept} bytes (everything before the damage) were replayed, the other {size - kept} bytes "
            "were not" if kept else "nothing from it was replayed")
    msg = (f"WARNING: the write-ahead log of {path} could not be replayed safely ({reason}). It was moved aside, not "
           f"deleted, to {target}; {tail}. Keep that file: it may hold recent changes. The database was opened.")
    log.warning(msg)
    return msg, size - kept


def check_wal_before_open(path: str) -> list[tuple[str, int]]:
    wal = path + ".wal"
    try:
        if not os.path.isfile(wal) or os.path.getsize(wal) == 0:
            return []
        with open(wal, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            state, offset = inspect_wal(fh, size)
    except OSError as e:
        raise StorageError(f"Cannot read the write-ahead log {wal}: {e}.") from None
    if state == "garbage":
        return [quarantine_wal(path, 0, "it is not a DuckDB write-ahead log")]
    if state == "torn":
        return [quarantine_wal(path, offset, f"its entry at byte {offset} is incomplete: {size - offset} bytes "
                                             "from there on cannot be read. After a crash while saving this is the "
                                             "unfinished save, which was never confirmed")]
    return []


_WAL_POSITION = re.compile(r"entry at byte position (\d+)")


# ------------------------------------------------------------------------------------------ block checksums
_CHECKSUM_MUL = np.uint64(0xBF58476D1CE4E5B9)
_CHECKSUM_SEED = 5381
_HEADER_BYTES = 3 * 4096          # main header + two database headers (DuckDB verifies those itself at open)
_BLOCK_CHECKSUM_BYTES = 8
_CHUNK_BLOCKS = 32


def _bad_blocks(path: str, block_size: int, blocks: list[int] | None = None) -> tuple[list[int], int]:
    """(ids of blocks whose stored checksum does not match their content, number of blocks that match).

    DuckDB stores each block as [u64 checksum][payload] with checksum = 5381 XOR (every u64 word of the payload
    times 0xBF58476D1CE4E5B9); see duckdb/src/common/checksum.cpp. All-zero blocks (never written, or trimmed
    free space) are skipped."""
    if block_size <= _BLOCK_CHECKSUM_BYTES or block_size % 8:
        return [], 0
    bad, good = [], 0
    words = block_size // 8
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        n_blocks = max(0, (size - _HEADER_BYTES) // block_size)
        ids = list(range(n_blocks)) if blocks is None else [b for b in blocks if 0 <= b < n_blocks]
        for start in range(0, len(ids), _CHUNK_BLOCKS):
            part = ids[start:start + _CHUNK_BLOCKS]
            if blocks is None:   # contiguous: one read
                fh.seek(_HEADER_BYTES + part[0] * block_size)
                raw = fh.read(len(part) * block_size)
            else:
                chunks = []
                for b in part:
                    fh.seek(_HEADER_BYTES + b * block_size)
                    chunks.append(fh.read(block_size))
                raw = b"".join(chunks)
            arr = np.frombuffer(raw, dtype="<u8")[: len(part) * words].reshape(len(part), words)
            with np.errstate(over="ignore"):
                computed = np.bitwise_xor.reduce(arr[:, 1:] * _CHECKSUM_MUL, axis=1) ^ np.uint64(_CHECKSUM_SEED)
            zero = ~arr.any(axis=1)
            ok = (computed == arr[:, 0]) | zero
            good += int((computed == arr[:, 0]).sum())
            bad.extend(int(b) for b, o in zip(part, ok) if not o)
    return bad, good


def _scan_tables(con) -> None:
    """Read every column of every table once (DuckDB verifies the checksum of each block it reads)."""
    tables = con.execute("SELECT schema_name, table_name FROM duckdb_tables() "
                         "WHERE database_name = current_database() ORDER BY 1, 2").fetchall()
    for schema, table in tables:
        con.execute(f'SELECT count(*), bit_xor(hash(COLUMNS(*))) FROM "{schema}"."{table}"').fetchall()


def _damaged(path: str, detail: str) -> StorageError:
    return StorageError(f"The database file {path} is damaged: {detail}. " + RESTORE_ADVICE)


def verify_file(con, path: str) -> list[str]:
    """Start-up integrity check of an open database file. Raises StorageError when a block in use is damaged;
    returns warnings for a damaged block that may be unused space. Cost: one sequential read of the file."""
    cur = con.cursor()
    try:
        try:
            row = cur.execute("SELECT block_size, total_blocks, free_blocks FROM pragma_database_size() "
                              "WHERE database_name = current_database()").fetchall()
        except duckdb.Error:
            row = []
        if not row:
            return []
        block_size, total_blocks, free_blocks = (int(x) for x in row[0])
        bad, good = _bad_blocks(path, block_size)
        if bad:
            bad, _ = _bad_blocks(path, block_size, bad)  # read again: a block written meanwhile is not damage
        in_file = max(0, (os.path.getsize(path) - _HEADER_BYTES) // block_size)
        missing = list(range(in_file, total_blocks))   # blocks the database counts but the file cut off
        suspect = bad + missing
        if not suspect:
            return []
        where = ", ".join(str(_HEADER_BYTES + b * block_size) for b in suspect[:5])
        where += " ..." if len(suspect) > 5 else ""
        what = (f"{len(bad)} block(s) at byte offset {where} fail their checksum" if bad else
                f"the file ends after {in_file} of its {total_blocks} blocks (it was cut short)")
        try:
            _scan_tables(cur)           # reads every block of table data: DuckDB checks each checksum
        except duckdb.Error as e:
            raise _damaged(path, f"{what}; reading the tables fails ({short(e, 160)})") from None
        if good == 0 and not missing:
            return []  # the checksum layout is not the one this code knows: rely on DuckDB's own checks
        used: set[int] = set()
        try:
            used |= {r[0] for r in cur.execute("SELECT block_id FROM pragma_metadata_info()").fetchall()}
            for schema, table in cur.execute("SELECT schema_name, table_name FROM duckdb_tables() "
                                             "WHERE database_name = current_database()").fetchall():
                for block, more in cur.execute(f"SELECT block_id, additional_block_ids FROM "
                                               f"pragma_storage_info('{schema}.{table}')").fetchall():
                    used.add(block)
                    used.update(more or ())
        except duckdb.Error:
            pass
        # Index blocks are not listed anywhere, but the free ones are counted: more suspect blocks than free
        # blocks means at least one block in use is damaged.
        if set(suspect) & used or len(suspect) > free_blocks:
            raise _damaged(path, what)
        msg = (f"WARNING: in {path}, {what}. They are either free space (harmless) or part of an index; if saving "
               "a label fails with 'damaged', " + RESTORE_ADVICE[0].lower() + RESTORE_ADVICE[1:])
        log.warning(msg)
        return [msg]
    finally:
        cur.close()


# ------------------------------------------------------------------------------------------ open
def connect(path: str, read_only: bool) -> tuple[duckdb.DuckDBPyConnection, list[tuple[str, int]]]:
    """Open the file; returns the connection and the write-ahead logs quarantined on the way as (warning, bytes
    not replayed)."""
    if path == MEMORY:
        return duckdb.connect(MEMORY), []
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise StorageError(f"Cannot open the database {path}: the folder {parent} does not exist. "
                           "Create the folder first or pass a different --db path.")
    if os.path.isdir(path):
        raise StorageError(f"Cannot open the database {path}: it is a folder, not a file. "
                           "Pass a file path with --db.")
    warnings: list[tuple[str, int]] = []
    if not os.path.exists(path):
        if read_only:
            raise StorageError(f"Cannot open the database {path} read-only: the file does not exist.")
    elif os.path.getsize(path) == 0 and not read_only and not os.path.exists(path + ".wal"):
        os.remove(path)  # an empty placeholder (e.g. from `touch`) holds no data: start a new database there
    if not read_only and os.path.isfile(path):
        warnings += check_wal_before_open(path)
    for attempt in range(3):
        try:
            return duckdb.connect(path, read_only=read_only), warnings
        except duckdb.Error as e:
            msg = str(e)
            if "Could not set lock" in msg or "Conflicting lock" in msg:
                pid = re.search(r"\(PID (\d+)\)", msg)
                who = f"another process (PID {pid.group(1)})" if pid else "another process"
                raise StorageError(
                    f"The database file {path} is locked: {who} holds it open. Close that program "
                    "(another RLHF Studio or a notebook), or start with a different --db path.") from None
            if "not a valid DuckDB database" in msg:
                raise StorageError(f"The file {path} is not a DuckDB database. Pass a different --db path "
                                   "(a new file name creates a new database).") from None
            if "different configuration" in msg:
                raise StorageError(f"The database file {path} is already open in this process with other "
                                   "settings (read-only vs read-write). Close it first.") from None
            if "replaying WAL" in msg or "Corrupt WAL" in msg or "replaying checkpoint WAL" in msg:
                main_wal = f'"{path}.wal"' in msg and "checkpoint WAL" not in msg
                damaged = any(k in msg for k in ("Corrupt WAL", "checksum", "Serialization", "Failed to read WAL"))
                if not damaged:   # e.g. the disk is full or memory ran out while replaying: nothing to quarantine
                    raise StorageError(f"The write-ahead log of {path} could not be replayed ({short(msg, 200)}). "
                                       "Nothing was changed: fix the cause (free disk space or memory) and start "
                                       "again.") from None
                if read_only or attempt == 2 or not main_wal or not os.path.isfile(path + ".wal"):
                    raise StorageError(
                        f"The write-ahead log of {path} cannot be replayed ({short(msg, 200)}). "
                        + ("Open the database read-write once: the log is then moved aside and the database opens."
                           if read_only else RESTORE_ADVICE)) from None
                pos = _WAL_POSITION.search(msg)   # the payload of the bad entry; its frame starts 16 bytes before
                keep = max(0, int(pos.group(1)) - 16) if pos else 0
                warnings.append(quarantine_wal(path, keep, short(msg, 200)))
                continue
            if "Corrupt database file" in msg:
                raise _damaged(path, short(msg, 200)) from None
            raise StorageError(f"Cannot open the database {path}: {short(msg)}") from None
    raise StorageError(f"Cannot open the database {path}.")  # not reached
