"""gguf-py's GGUFReader without one numpy view per string of an array of strings.

gguf-py's reader makes two memory-mapped numpy views (length and bytes) for every string of every
array-of-strings field while it parses the header.  A Qwen2.5 vocabulary (151,936 tokens and
151,387 merges) becomes ~600,000 such objects: ~450 MB of Python memory and ~14 s for each file
opened, and lrq-calibrate opens its files several times (RESULTS "How the pipeline grows with the
model").  ``LeanGGUFReader`` parses every other field exactly as gguf-py does; an array of
strings keeps only the offset of each string (8 bytes each) and makes a string's two views when
they are asked for; an array of numbers is one view (gguf-py: one per element).  Its fields
behave as gguf-py's: ``contents()``, ``parts[i]`` for the indices in ``data``, ``len(data)``,
``types`` (tests/test_gguf_lean.py compares both readers field by field on a GGUF of every value
type, the tiny models, an LRQ file and the bundled SmolLM2).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

# gguf-py's layout of an array field's parts: [key length, key, value type, item type, count,
# then per item its parts]; a string item has two parts (length, bytes), the bytes being its data
_HEAD_PARTS = 5


class _LazyParts(Sequence):
    """An array field's parts as gguf-py lists them: the head parts, then each item's parts, the
    latter made when asked for (``_item``)."""

    def __init__(self, head: list, n_item_parts: int):
        self._head, self._n = head, _HEAD_PARTS + n_item_parts

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"part {i} of {self._n}")
        return self._head[i] if i < _HEAD_PARTS else self._item(i - _HEAD_PARTS)

    def _item(self, k: int):
        raise NotImplementedError


class _StringArrayParts(_LazyParts):
    """The parts of an array-of-strings field, each string's two views made on demand."""

    def __init__(self, reader: "LeanGGUFReader", head: list, starts: np.ndarray):
        super().__init__(head, 2 * len(starts))
        self._reader, self._starts = reader, starts

    def _item(self, k: int):
        s, which = divmod(k, 2)
        off = int(self._starts[s])
        slen = self._reader._get(off, np.uint64)
        return slen if which == 0 else self._reader._get(off + 8, np.uint8, slen[0])


class _ScalarArrayParts(_LazyParts):
    """The parts of an array-of-scalars field: one view of the whole array, one-element views of
    it made on demand (gguf-py makes one view per element: token types, scores)."""

    def __init__(self, head: list, values: np.ndarray):
        super().__init__(head, len(values))
        self._values = values

    def _item(self, k: int):
        return self._values[k:k + 1]


class LeanGGUFReader(GGUFReader):
    """GGUFReader whose arrays of strings cost 8 bytes per string (see the module doc)."""

    def _string_starts(self, offs: int, count: int) -> tuple[np.ndarray, int]:
        """Offsets of the ``count`` strings stored from ``offs`` (each a uint64 length and its
        bytes), and the offset after the last.  ValueError when they run past the file."""
        fmt = "<Q" if (sys.byteorder == "little") == (self.byte_order == "I") else ">Q"
        buf, size = memoryview(self.data), len(self.data)
        starts = np.empty(count, dtype=np.int64)
        unpack = struct.Struct(fmt).unpack_from
        for k in range(count):
            if offs + 8 > size:
                raise ValueError(f"string {k} of an array of {count} starts past the end of the file")
            starts[k] = offs
            offs += 8 + unpack(buf, offs)[0]
        if offs > size:
            raise ValueError(f"the last of an array of {count} strings ends past the end of the file")
        return starts, offs

    def _build_fields(self, offs: int, count: int) -> int:
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            parts = [kv_klen, kv_kdata, raw_kv_type]
            name = str(bytes(kv_kdata), encoding="utf-8")
            itype = int(self._get(offs, np.uint32)[0]) if raw_kv_type[0] == GGUFValueType.ARRAY else None
            nptype = self.gguf_scalar_to_np.get(itype)      # None for strings, nested arrays, junk
            if itype == GGUFValueType.STRING or nptype is not None:
                raw_itype = self._get(offs, np.uint32)
                alen = self._get(offs + 4, np.uint64)
                n = int(alen[0])
                head = parts + [raw_itype, alen]
                types = [GGUFValueType.ARRAY] + ([GGUFValueType(itype)] if n else [])
                if itype == GGUFValueType.STRING:
                    starts, end = self._string_starts(offs + 12, n)
                    field_parts, data = _StringArrayParts(self, head, starts), \
                        range(_HEAD_PARTS + 1, _HEAD_PARTS + 1 + 2 * n, 2)
                else:
                    values = self._get(offs + 12, nptype, n)
                    if len(values) != n:
                        raise ValueError(f"an array of {n} values runs past the end of the file")
                    field_parts, data = _ScalarArrayParts(head, values), range(_HEAD_PARTS, _HEAD_PARTS + n)
                    end = offs + 12 + int(values.nbytes)
                self._push_field(ReaderField(orig_offs, name, field_parts, data, types), skip_sum=True)
                offs = end
                continue
            idxs_offs = len(parts)
            field_size, field_parts, field_idxs, field_types = self._get_field_parts(offs, raw_kv_type[0])
            parts += field_parts
            self._push_field(ReaderField(orig_offs, name, parts,
                                         [idx + idxs_offs for idx in field_idxs], field_types),
                             skip_sum=True)
            offs += field_size
        return offs
