"""Weight storage: the one owner of every form a weight tensor can be stored in, and its size.

Each form is a ``Codec`` with ``encode(x) -> Encoded``, ``decode(Encoded) -> x`` (exact:
``decode(encode(x))`` equals ``x`` bit for bit) and ``size_bits(x)``. ``Encoded`` lists the
arrays a file would hold, each with the bits one element costs, so sizes are counted the same
way for every form.

* ``int8``: integer codes in [-128, 127], a byte each;
* ``int4``: codes in [-8, 7], two per byte (ONNX INT4's packing: low nibble first);
* ``indexed``: at most 2^b distinct values, a b-bit index per weight and a 2^b-entry codebook
  (power-of-two, APoT, k-means codes);
* ``palette``: a float tensor whose rows (along ``axis``) hold at most 2^b distinct values each,
  a b-bit index per weight and a float32 codebook per row (exact float palettization);
* ``nm``: N values per group of M along ``axis`` plus log2(M) bits of position each;
* ``relative``: Deep Compression's sparse form, each nonzero as a value plus the gap to the
  previous one in ``index_bits`` bits; a gap that does not fit costs a filler zero entry per
  2^index_bits positions.

* ``shared-palette``: k-means shared weights, a codebook per group of rows and an index per
  weight (the palettized ONNX form);
* ``stream``: an integer (or float) tensor as Deep Compression stores it: the positions of the
  entries that differ from a background symbol as relative gaps, and their values, each stream
  Huffman-coded (``huffman_*`` below) or fixed-width.

The ONNX lowering (``graphopt.quantizers.packing``) writes these forms as initializers plus
unpacking nodes, and reports (``sparsity_report``, ``inspect``) ask ``size_bits``; neither
restates a form's layout. Everything is vectorised numpy: no per-element Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import GraphOptError


@dataclass
class Encoded:
    """One stored tensor: ``fields`` maps a name to (array, bits per element) as a file holds it."""

    codec: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fields: dict[str, tuple[np.ndarray, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(sum(a.size * b for a, b in self.fields.values()))

    @property
    def nbytes(self) -> int:
        return -(-self.bits // 8)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.fields[name][0]


class Codec:
    """A weight storage form. Subclasses set ``name`` and implement ``fits``/``encode``/``decode``;
    ``size_bits`` defaults to encoding."""

    name: ClassVar[str] = ""

    def fits(self, x: np.ndarray) -> bool:
        """Whether this form stores ``x`` exactly."""
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> Encoded:
        raise NotImplementedError

    def decode(self, e: Encoded) -> np.ndarray:
        raise NotImplementedError

    def size_bits(self, x: np.ndarray) -> int:
        return self.encode(x).bits

    def _refuse(self, x: np.ndarray, why: str):
        raise GraphOptError(f"{self.name} storage cannot hold this tensor ({np.asarray(x).dtype}"
                            f"{list(np.shape(x))}): {why}")


def _int_range(x: np.ndarray, lo: int, hi: int) -> bool:
    x = np.asarray(x)
    if x.size == 0:
        return True
    if x.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
        return False
    return x.dtype.kind in "iuf" and int(x.min()) >= lo and int(x.max()) <= hi


class _IntegerCodes(Codec):
    """Integer codes in [lo, hi] (exactly integral values of any numeric dtype)."""

    lo: ClassVar[int] = 0
    hi: ClassVar[int] = 0

    def fits(self, x):
        return _int_range(x, self.lo, self.hi)

    def _checked(self, x) -> np.ndarray:
        if not self.fits(x):
            self._refuse(x, f"values outside the integers {self.lo}..{self.hi}")
        return np.asarray(x)


@dataclass(frozen=True)
class Int8(_IntegerCodes):
    name: ClassVar[str] = "int8"
    lo, hi = -128, 127

    def encode(self, x):
        x = self._checked(x)
        return Encoded(self.name, x.shape, x.dtype, {"codes": (x.astype(np.int8).reshape(-1), 8)})

    def decode(self, e):
        return e["codes"].reshape(e.shape).astype(e.dtype)


@dataclass(frozen=True)
class Int4(_IntegerCodes):
    name: ClassVar[str] = "int4"
    lo, hi = -8, 7

    def encode(self, x):
        x = self._checked(x)
        nib = (x.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        packed = nib[0::2] | (nib[1::2] << 4)  # low nibble first, as ONNX INT4
        return Encoded(self.name, x.shape, x.dtype, {"packed": (packed, 8)})

    def decode(self, e):
        p = e["packed"]
        nib = np.stack([p & 0x0F, p >> 4], 1).reshape(-1)[: math.prod(e.shape)].astype(np.int8)
        return np.where(nib > 7, nib - 16, nib).reshape(e.shape).astype(e.dtype)

    def size_bits(self, x):
        return 8 * -(-np.size(x) // 2)


@dataclass(frozen=True)
class Indexed(Codec):
    """A ``index_bits``-bit index per value into one codebook of 2^index_bits entries (unused
    entries are zero), each ``book_bits`` wide (8: int8 codes, 32: float32 values)."""

    name: ClassVar[str] = "indexed"
    index_bits: int = 4
    book_bits: int = 8

    def fits(self, x):
        x = np.asarray(x)
        if x.dtype.itemsize == 1 and x.dtype.kind in "iu":  # bytes: count levels in O(n), no sort
            levels = int(np.count_nonzero(np.bincount(x.view(np.uint8).reshape(-1), minlength=256)))
        else:
            levels = np.unique(x).size
        return levels <= 1 << self.index_bits

    def encode(self, x):
        x = np.asarray(x)
        book, index = np.unique(x.reshape(-1), return_inverse=True)
        if book.size > 1 << self.index_bits:
            self._refuse(x, f"{book.size} distinct values, more than 2^{self.index_bits}")
        book = np.concatenate([book, np.zeros((1 << self.index_bits) - book.size, book.dtype)])
        return Encoded(self.name, x.shape, x.dtype, {"index": (index.astype(np.uint8 if self.index_bits <= 8 else
                                                                              np.uint16), self.index_bits),
                                                      "codebook": (book, self.book_bits)})

    def decode(self, e):
        return e["codebook"][e["index"].astype(np.int64)].reshape(e.shape).astype(e.dtype)


@dataclass(frozen=True)
class Palette(Codec):
    """Float palettization: the rows along ``axis`` (one row when None) each hold at most
    2^index_bits distinct values; a uint8 index per value and a float32 codebook per row, as
    wide as the row with the most levels."""

    name: ClassVar[str] = "palette"
    axis: int | None = 0
    index_bits: int = 8

    def _rows(self, x: np.ndarray) -> np.ndarray:
        moved = np.moveaxis(x, self.axis, 0) if self.axis is not None else x.reshape(1, -1)
        return moved.reshape(moved.shape[0], -1)

    def _levels(self, rows: np.ndarray):
        order = np.argsort(rows, axis=1, kind="stable")
        s = np.take_along_axis(rows, order, 1)
        new = np.concatenate([np.ones((rows.shape[0], 1), bool), s[:, 1:] != s[:, :-1]], 1)
        rank = np.cumsum(new, 1) - 1  # level index of each sorted value
        return order, s, rank

    def fits(self, x):
        x = np.asarray(x, np.float32)
        if x.size == 0:
            return True
        _, _, rank = self._levels(self._rows(x))
        return int(rank.max()) + 1 <= 1 << self.index_bits

    def encode(self, x):
        x = np.asarray(x, np.float32)
        rows = self._rows(x)
        order, s, rank = self._levels(rows)
        levels = int(rank.max(initial=0)) + 1
        if levels > 1 << self.index_bits:
            self._refuse(x, f"a row has {levels} distinct values, more than 2^{self.index_bits}")
        book = np.zeros((rows.shape[0], levels), np.float32)
        np.put_along_axis(book, rank, s, 1)
        idx = np.empty_like(rank)
        np.put_along_axis(idx, order, rank, 1)
        return Encoded(self.name, x.shape, x.dtype, {"index": (idx.astype(np.uint8), self.index_bits),
                                                     "codebook": (book, 32)}, {"axis": self.axis})

    def decode(self, e):
        rows = np.take_along_axis(e["codebook"], e["index"].astype(np.int64), 1)
        if self.axis is None:
            return rows.reshape(e.shape)
        moved_shape = (e.shape[self.axis],) + tuple(d for i, d in enumerate(e.shape) if i != self.axis)
        return np.moveaxis(rows.reshape(moved_shape), 0, self.axis)


@dataclass(frozen=True)
class NM(Codec):
    """N:M structured sparsity along ``axis``: each group of M consecutive values keeps N slots,
    a ``value_bits`` value and a log2(M)-bit position each."""

    name: ClassVar[str] = "nm"
    n: int = 2
    m: int = 4
    axis: int = 1
    value_bits: int = 32

    @property
    def pos_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m)))

    def _groups(self, x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, self.axis, -1).reshape(-1, self.m)

    def fits(self, x):
        x = np.asarray(x)
        return x.ndim > self.axis and x.shape[self.axis] % self.m == 0 and (
            x.size == 0 or int((self._groups(x) != 0).sum(1).max()) <= self.n)

    def encode(self, x):
        x = np.asarray(x)
        if not self.fits(x):
            self._refuse(x, f"not {self.n}:{self.m} sparse along axis {self.axis}")
        grp = self._groups(x)
        pos = np.argsort(grp == 0, axis=1, kind="stable")[:, : self.n]  # nonzeros first, then zero slots
        vals = np.take_along_axis(grp, pos, 1)
        return Encoded(self.name, x.shape, x.dtype, {"values": (vals, self.value_bits),
                                                     "positions": (pos.astype(np.uint8), self.pos_bits)})

    def decode(self, e):
        vals, pos = e["values"], e["positions"].astype(np.int64)
        grp = np.zeros((vals.shape[0], self.m), e.dtype)
        np.put_along_axis(grp, pos, vals, 1)
        moved = list(e.shape)
        moved.append(moved.pop(self.axis))
        return np.moveaxis(grp.reshape(moved), -1, self.axis)

    def size_bits(self, x):
        return int(np.size(x) // self.m * self.n * (self.value_bits + self.pos_bits))


@dataclass(frozen=True)
class Relative(Codec):
    """Deep Compression's sparse form (Han et al. 2016, section 3): the nonzeros in order, each
    with the count of zeros before it in ``index_bits`` bits. A run of zeros longer than
    2^index_bits - 1 is bridged by filler entries (value 0, gap 2^index_bits - 1), each
    standing for 2^index_bits positions."""

    name: ClassVar[str] = "relative"
    index_bits: int = 4
    value_bits: int = 32

    def fits(self, x):
        return True

    def _layout(self, flat: np.ndarray):
        pos = np.flatnonzero(flat)
        gaps = np.diff(np.concatenate([[-1], pos])) - 1
        span = (1 << self.index_bits) - 1
        fillers = gaps // (span + 1)
        return pos, gaps, fillers, span

    def encode(self, x):
        x = np.asarray(x)
        flat = x.reshape(-1)
        pos, gaps, fillers, span = self._layout(flat)
        ends = np.cumsum(fillers + 1) - 1  # the entry of each nonzero, after its fillers
        n = int(ends[-1]) + 1 if pos.size else 0
        values = np.zeros(n, x.dtype)
        values[ends] = flat[pos]
        gap = np.full(n, span, np.uint16 if self.index_bits > 8 else np.uint8)
        gap[ends] = gaps - fillers * (span + 1)
        return Encoded(self.name, x.shape, x.dtype, {"values": (values, self.value_bits),
                                                     "gaps": (gap, self.index_bits)})

    def decode(self, e):
        out = np.zeros(math.prod(e.shape), e.dtype)
        pos = np.cumsum(e["gaps"].astype(np.int64) + 1) - 1
        out[pos] = e["values"]
        return out.reshape(e.shape)

    def size_bits(self, x):
        pos, _, fillers, _ = self._layout(np.asarray(x).reshape(-1))
        return int((pos.size + int(fillers.sum())) * (self.value_bits + self.index_bits))


@dataclass(frozen=True)
class SharedPalette(Codec):
    """k-means weight sharing stored dense: one codebook per group of ``group_rows`` consecutive
    rows along ``axis`` (one group when ``axis`` is None) and an index per weight. Zeros get an
    entry of their own after the centroids when the tensor has any, so the index needs
    ceil(log2(k + 1)) bits then; it is written in 4 bits (two per byte, ONNX UINT4) when it
    fits, else 8 or 16. What the palettized ONNX holds (``packing.palette_weight``)."""

    name: ClassVar[str] = "shared-palette"
    axis: int | None = None
    group_rows: int = 1
    book_bits: int = 32

    def _rows(self, x: np.ndarray) -> np.ndarray:
        moved = np.moveaxis(x, self.axis, 0) if self.axis is not None else x.reshape(1, -1)
        return moved.reshape(moved.shape[0], -1)

    def fits(self, x):
        return True

    @staticmethod
    def form(book: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(codebook [G, k'] with a zero entry appended when ``index`` has pruned (-1) entries,
        index >= 0 into it, the container bits: 4, 8 or 16)."""
        book = np.asarray(book, np.float32)
        index = np.asarray(index, np.int64)
        k = book.shape[1]
        if (index < 0).any():
            book = np.concatenate([book, np.zeros((book.shape[0], 1), np.float32)], 1)
            index = np.where(index < 0, k, index)
        k = book.shape[1]
        return book, index, 4 if k <= 16 else 8 if k <= 256 else 16

    def _group_view(self, rows: np.ndarray) -> np.ndarray:
        """[groups, group_rows * n]; the last group padded with zeros (not levels)."""
        g = -(-rows.shape[0] // self.group_rows)
        pad = np.zeros((g * self.group_rows - rows.shape[0], rows.shape[1]), rows.dtype)
        return np.concatenate([rows, pad]).reshape(g, -1)

    def encode(self, x):
        x = np.asarray(x, np.float32)
        rows = self._rows(x)
        v = self._group_view(rows)
        order = np.argsort(np.where(v != 0, v, np.inf), axis=1, kind="stable")  # nonzeros first, sorted
        s = np.take_along_axis(v, order, 1)
        nz = np.take_along_axis(v != 0, order, 1)
        new = np.concatenate([nz[:, :1], (s[:, 1:] != s[:, :-1]) & nz[:, 1:]], 1)
        rank = np.where(nz, np.cumsum(new, 1) - 1, -1)  # level of each sorted value; -1 for a zero
        k = max(int(rank.max(initial=0)) + 1, 1)
        book = np.zeros((v.shape[0], k + 1), np.float32)  # zeros write to the spare last column
        np.put_along_axis(book, np.where(nz, rank, k), np.where(nz, s, 0), 1)
        book = book[:, :k]
        idx = np.empty_like(rank)
        np.put_along_axis(idx, order, rank, 1)
        idx = idx.reshape(-1, rows.shape[1])[: rows.shape[0]]
        book, idx, bits = self.form(book, idx)
        return Encoded(self.name, x.shape, x.dtype, {"codebook": (book, self.book_bits),
                                                     "index": (idx.astype(np.uint16), bits)},
                       {"axis": self.axis, "group_rows": self.group_rows})

    def decode(self, e):
        book, idx = e["codebook"], e["index"].astype(np.int64)
        gid = np.arange(idx.shape[0]) // self.group_rows
        rows = book[gid[:, None], idx]
        if self.axis is None:
            return rows.reshape(e.shape).astype(e.dtype)
        moved = (e.shape[self.axis],) + tuple(d for i, d in enumerate(e.shape) if i != self.axis)
        return np.moveaxis(rows.reshape(moved), 0, self.axis).astype(e.dtype)





# ------------------------------------------------------------------ Huffman coding
HUFFMAN_MAX_LEN = 16  # code lengths are limited so that decoding is one table lookup per bit position


def huffman_lengths(counts: np.ndarray, max_len: int = HUFFMAN_MAX_LEN) -> np.ndarray:
    """Code length of each symbol (0 for a symbol that never occurs) of a Huffman code for
    ``counts``, limited to ``max_len`` bits by halving the counts until it fits (the zlib-style
    heuristic; a code within a fraction of a percent of optimal at our alphabet sizes). A lone
    symbol gets a 1-bit code. The heap loop runs over symbols (at most 2^16), never over data."""
    import heapq

    counts = np.asarray(counts, np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, np.int64)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    c = counts[used].copy()
    while True:
        heap = [(int(w), i, (i,)) for i, w in enumerate(c)]
        heapq.heapify(heap)
        depth = np.zeros(used.size, np.int64)
        tie = used.size
        while len(heap) > 1:
            w1, _, a = heapq.heappop(heap)
            w2, _, b = heapq.heappop(heap)
            depth[list(a + b)] += 1
            heapq.heappush(heap, (w1 + w2, tie, a + b))
            tie += 1
        if depth.max() <= max_len:
            lengths[used] = depth
            return lengths
        c = np.maximum(c >> 1, 1)


def huffman_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (as integers, most significant bit first) for code ``lengths``: symbols
    sorted by (length, symbol) take consecutive codes, so the lengths alone describe the code."""
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.int64)
    order = sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s))
    code, prev = 0, 0
    for s in order:  # one step per symbol of the alphabet
        code <<= int(lengths[s]) - prev
        codes[s], prev = code, int(lengths[s])
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """The canonical Huffman bit stream of ``symbols`` (bytes, zero-padded; and its bit count),
    vectorised: each symbol's code as a row of bits, the used bits selected and packed."""
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64)
    if symbols.size == 0:
        return b"", 0
    if np.any(lengths[symbols] == 0):
        raise GraphOptError("huffman: a symbol to encode has no code (its count was zero)")
    L = int(lengths.max())
    codes = huffman_codes(lengths)
    shifts = np.arange(L - 1, -1, -1)
    table = ((codes[:, None] << (L - lengths)[:, None]) >> shifts[None, :]) & 1  # codes left-aligned
    keep = np.arange(L)[None, :] < lengths[symbols][:, None]
    bits = table[symbols][keep].astype(np.uint8)
    return np.packbits(bits).tobytes(), int(bits.size)


def huffman_decode(data: bytes, nbits: int, lengths: np.ndarray, count: int) -> np.ndarray:
    """``count`` symbols from a canonical Huffman stream, vectorised: the symbol and length at
    every bit position come from one lookup of the next ``max length`` bits; the positions
    where codes start are found by pointer doubling (log2(count) gathers), not a loop over
    symbols. Raises on a stream that does not decode to exactly ``count`` symbols in ``nbits``."""
    lengths = np.asarray(lengths, np.int64)
    if count == 0:
        return np.zeros(0, np.int64)
    if nbits > 8 * len(data) or not lengths.any():
        raise GraphOptError("corrupt Huffman stream: fewer bits than its header says")
    L = int(lengths.max())
    codes = huffman_codes(lengths)
    sym_at = np.full(1 << L, -1, np.int64)
    len_at = np.zeros(1 << L, np.int64)
    for s in np.flatnonzero(lengths):  # fill the table: one slice per symbol of the alphabet
        lo = int(codes[s]) << (L - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (L - int(lengths[s]))
        sym_at[lo:hi], len_at[lo:hi] = s, lengths[s]
    bits = np.concatenate([np.unpackbits(np.frombuffer(data, np.uint8))[:nbits], np.zeros(L, np.uint8)])
    win = np.lib.stride_tricks.sliding_window_view(bits, L)[: nbits + 1] @ (1 << np.arange(L - 1, -1, -1))
    step = len_at[win]
    nxt = np.minimum(np.arange(nbits + 1) + np.where(step > 0, step, nbits + 1), nbits)
    nxt[nbits] = nbits
    pos = np.zeros(count, np.int64)
    i = np.arange(count)
    jump = nxt
    for k in range(max(int(count - 1).bit_length(), 1)):
        pos = np.where((i >> k) & 1, jump[pos], pos)
        jump = jump[jump]
    if pos[-1] >= nbits or np.any(step[pos] == 0) or pos[-1] + step[pos[-1]] != nbits:
        raise GraphOptError("corrupt Huffman stream: its bits do not decode to the symbol count in its header")
    return sym_at[win[pos]]


def _gap_layout(keep: np.ndarray, gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(gap symbols, whether each is a skip): each kept position as the count of positions since
    the previous one; a count that does not fit ``gap_bits`` is split by skip symbols
    (2^gap_bits - 1, "move on that many positions, no value")."""
    pos = np.flatnonzero(keep)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    span = (1 << gap_bits) - 1
    skips = gaps // span
    n = int(skips.sum()) + pos.size
    ends = np.cumsum(skips + 1) - 1  # each kept entry's slot, after its skips
    sym = np.full(n, span, np.int64)
    sym[ends] = gaps % span
    real = np.zeros(n, bool)
    real[ends] = True
    return sym, real


@dataclass(frozen=True)
class Stream(Codec):
    """Deep Compression's storage of one tensor (Han et al. 2016, sections 3-4): the entries
    that differ from the ``background`` value (the pruned zeros; for an index tensor, the
    zero slot) as relative positions in ``gap_bits`` (a longer run is bridged by skip
    symbols that carry no value), their values in ``value_bits`` (an index: its width; a float
    weight: 32), each stream Huffman-coded when ``huffman`` (else fixed-width). With
    ``gap_bits`` 0 the tensor is stored dense (every value, no positions). Exact for any
    tensor; ``size_bits`` counts what a file holds (code tables included)."""

    name: ClassVar[str] = "stream"
    gap_bits: int = 4
    value_bits: int = 4
    huffman: bool = True
    background: float = 0

    def fits(self, x):
        return True

    def _streams(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        flat = np.asarray(x).reshape(-1)
        if not self.gap_bits:
            return flat, None
        keep = flat != flat.dtype.type(self.background)
        gaps, _ = _gap_layout(keep, self.gap_bits)
        return flat[keep], gaps

    def encode(self, x):
        x = np.asarray(x)
        values, gaps = self._streams(x)
        fields: dict[str, tuple[np.ndarray, int]] = {}
        meta: dict[str, Any] = {"count": int(values.size)}
        integer = x.dtype.kind in "iu"
        for tag, arr, width in (("values", values, self.value_bits), ("gaps", gaps, self.gap_bits)):
            if arr is None:
                continue
            if self.huffman and (integer or tag == "gaps"):
                sym = arr.astype(np.int64)
                if sym.size and (sym.min() < 0 or sym.max() >= 1 << 16):
                    self._refuse(x, "values outside 0..65535 cannot be Huffman-coded")
                lengths = huffman_lengths(np.bincount(sym, minlength=int(sym.max(initial=0)) + 1))
                data, nbits = huffman_encode(sym, lengths)
                fields[tag] = (np.frombuffer(data, np.uint8), 8)
                fields[f"{tag}_lengths"] = (lengths.astype(np.uint8), 5)  # the code table: a length per symbol
                meta[f"{tag}_nbits"], meta[f"{tag}_count"] = nbits, int(sym.size)
            else:
                fields[tag] = (arr, width)
                meta[f"{tag}_count"] = int(arr.size)
        return Encoded(self.name, x.shape, x.dtype, fields, meta)

    def _stream(self, e: Encoded, tag: str) -> np.ndarray:
        if f"{tag}_lengths" in e.fields:
            return huffman_decode(e[tag].tobytes(), e.meta[f"{tag}_nbits"], e[f"{tag}_lengths"],
                                  e.meta[f"{tag}_count"])
        return e[tag]

    def decode(self, e):
        n = math.prod(e.shape)
        values = self._stream(e, "values")
        if not self.gap_bits:
            if values.size != n:
                raise GraphOptError(f"corrupt stream: {values.size} values for a tensor of {n}")
            return values.astype(e.dtype).reshape(e.shape)
        gaps = self._stream(e, "gaps").astype(np.int64)
        span = (1 << self.gap_bits) - 1
        skip = gaps == span
        pos = (np.cumsum(np.where(skip, span, gaps + 1)) - 1)[~skip]
        if pos.size != values.size or (pos.size and pos[-1] >= n):
            raise GraphOptError(f"corrupt stream: {pos.size} positions for {values.size} values in a tensor of {n}")
        out = np.full(n, self.background, e.dtype)
        out[pos] = values
        return out.reshape(e.shape)

    def size_bits(self, x):
        return self.encode(x).bits


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Int8, Int4, Indexed, Palette, NM, Relative, SharedPalette,
                                                      Stream)}


def get(name: str, **options) -> Codec:
    """The codec named ``name`` with its options, e.g. ``get("relative", index_bits=5)``."""
    if name not in CODECS:
        import difflib

        near = difflib.get_close_matches(name, CODECS, 1)
        raise GraphOptError(f"unknown weight storage '{name}'" + (f"; did you mean '{near[0]}'?" if near else
                                                                   f"; known: {', '.join(CODECS)}"))
    return CODECS[name](**options)


def smallest_int8_form(codes: np.ndarray) -> Codec:
    """The smallest form onnxruntime can unpack into an int8 initializer at session start: int4
    for codes in [-8, 7], else a 4-bit index into 16 int8 codes, else int8."""
    for c in (Int4(), Indexed(4, 8)):
        if c.fits(codes):
            return c
    return Int8()
