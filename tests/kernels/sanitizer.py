"""A memory sanitizer for Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).

The interpreter runs a launch's programs one after another, so the kernel tests cannot see the
bugs that only parallel execution shows, and it reads and writes raw host addresses, so an
access past the end of a tensor reads or corrupts whatever lies there instead of failing.
``Sanitizer`` records every masked-in element a kernel loads or stores, per program, and after
each launch checks the four properties the kernels rely on (docs/KERNELS.md, "No atomics,
deterministic"), which make their GPU results independent of the order programs run in:

- **bounds**: every byte accessed lies inside a tensor argument of the launch (its exact
  strided extent, not its storage), or inside a tensor of a pointer table passed to it;
- **one writer**: no byte is stored by two programs of the launch (a write-write race);
- **no cross-program read of a write**: no program reads a byte another program of the same
  launch stores (a read-write race: its value depends on the schedule);
- **no read-after-write inside a program**: no program reads a byte it stored earlier in the
  launch. Triton orders global memory only through data dependences, and another thread of
  the same program may hold that element, so such a read needs a barrier the kernels never
  emit.

It works by wrapping ``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` (every
``tl.load`` / ``tl.store`` goes through them) and ``GridExecutor.__call__`` (one launch), on
triton 3.6 to 3.9; and ``blazec.kernels._common.pointer_table``, to learn which tensors a
pointer table addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Launch:
    """What one kernel launch accessed, and the violations found in it."""

    kernel: str
    programs: int
    read_bytes: int = 0
    written_bytes: int = 0
    violations: list[str] = field(default_factory=list)


def _byte_extent(t: torch.Tensor) -> np.ndarray:
    """The addresses of every byte of ``t``'s elements (strided, not its whole storage)."""
    if t.numel() == 0:
        return np.zeros(0, dtype=np.uint64)
    offs = np.zeros(1, dtype=np.int64)
    for size, stride in zip(t.shape, t.stride()):
        offs = (offs[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
    elems = np.uint64(t.data_ptr()) + (offs * t.element_size()).astype(np.uint64)
    return _bytes(elems, t.element_size())


def _bytes(elems: np.ndarray, size: int) -> np.ndarray:
    return (elems[:, None] + np.arange(size, dtype=np.uint64)[None, :]).reshape(-1)


def _lookup(sorted_unique: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``q``: its index in ``sorted_unique`` and whether it is there (``np.isin``
    by binary search, without sorting ``q``)."""
    if sorted_unique.size == 0:
        return np.zeros(q.shape, dtype=np.int64), np.zeros(q.shape, dtype=bool)
    i = np.minimum(np.searchsorted(sorted_unique, q), sorted_unique.size - 1)
    return i, sorted_unique[i] == q


def _fmt(addrs: np.ndarray, limit: int = 3) -> str:
    shown = ", ".join(hex(int(a)) for a in addrs[:limit])
    return shown + (f" (+{len(addrs) - limit} more)" if len(addrs) > limit else "")


class Sanitizer:
    """Context manager: ``with Sanitizer() as san: ...`` then ``san.assert_clean()``."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        # table data_ptr -> the tensors it addresses. An entry outlives a freed table, so an int64
        # argument later allocated at the same address would be allowed those tensors too: that
        # can only hide an out-of-bounds access, never report one that did not happen.
        self._tables: dict[int, list[torch.Tensor]] = {}
        self._rec: list | None = None
        self._seq = 0

    # -- recording ---------------------------------------------------------------------------

    def _record(self, kind: str, ptrs, mask):
        """Record a load's or store's masked-in bytes; return the mask with every element that
        lies outside the launch's tensors switched off, so that the interpreter does not touch
        memory it does not own (the access is reported instead)."""
        if self._rec is None:
            return mask
        from triton.runtime import interpreter as ti

        addrs = np.asarray(ptrs.data)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        elems = addrs[m].astype(np.uint64).reshape(-1)
        if elems.size == 0:
            return mask
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        x, y, z = ti.interpreter_builder.grid_idx
        gx, gy, _ = ti.interpreter_builder.grid_dim
        pid = (z * gy + y) * gx + x
        self._seq += 1
        nbytes = _bytes(elems, size)
        inside = _lookup(self._allowed_now, nbytes)[1].reshape(-1, size).all(1)
        if not inside.all():
            self._outside[kind].append(nbytes.reshape(-1, size)[~inside].reshape(-1))
            safe = m.copy()
            safe[m] = inside
            mask = ti.TensorHandle(safe, mask.dtype)
            nbytes = _bytes(elems[inside], size)
        self._rec.append((kind, pid, self._seq, nbytes))
        return mask

    def __enter__(self) -> "Sanitizer":
        from triton.runtime import interpreter as ti

        from blazec.kernels import _common

        b = ti.interpreter_builder
        cls = type(b)
        san = self

        def guarded(kind, method, mask_pos):
            def access(*args, **kwargs):
                args = list(args)
                if len(args) > mask_pos:
                    args[mask_pos] = san._record(kind, args[0], args[mask_pos])
                else:
                    kwargs["mask"] = san._record(kind, args[0], kwargs["mask"])
                return method(b, *args, **kwargs)

            return access

        load = guarded("read", cls.create_masked_load, 1)  # (ptrs, mask, other, ...)
        store = guarded("write", cls.create_masked_store, 2)  # (ptrs, value, mask, ...)

        orig_call = ti.GridExecutor.__call__

        def call(executor, *args, **kwargs):
            return san._launch(orig_call, executor, args, kwargs)

        orig_table = _common.pointer_table

        def pointer_table(ts):
            out = orig_table(ts)
            san._tables[out[0].data_ptr()] = list(ts)
            return out

        self._undo = [
            lambda: delattr(b, "create_masked_load"),
            lambda: delattr(b, "create_masked_store"),
            lambda: setattr(ti.GridExecutor, "__call__", orig_call),
            lambda: setattr(_common, "pointer_table", orig_table),
        ]
        b.create_masked_load, b.create_masked_store = load, store
        ti.GridExecutor.__call__ = call
        _common.pointer_table = pointer_table
        return self

    def __exit__(self, *exc) -> None:
        for undo in self._undo:
            undo()

    # -- one launch --------------------------------------------------------------------------

    def _allowed(self, values) -> np.ndarray:
        parts = []
        for v in values:
            if isinstance(v, torch.Tensor):
                parts.append(_byte_extent(v))
                for t in self._tables.get(v.data_ptr(), []) if v.dtype == torch.int64 else []:
                    parts.append(_byte_extent(t))
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)

    def _launch(self, orig_call, executor, args, kwargs):
        self._allowed_now = self._allowed([*args, *kwargs.values()])
        self._rec, self._seq, self._outside = [], 0, {"read": [], "write": []}
        try:
            out = orig_call(executor, *args, **kwargs)
            rec = self._rec
        finally:
            self._rec = None
        name = getattr(executor.fn, "__name__", str(executor.fn))
        self.launches.append(self._analyze(name, rec, self._outside))
        return out

    @staticmethod
    def _analyze(name: str, rec: list, outside: dict) -> Launch:
        def cat(kind):
            rows = [(np.full(a.size, pid, np.int64), np.full(a.size, seq, np.int64), a)
                    for k, pid, seq, a in rec if k == kind]
            if not rows:
                return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64))
            return tuple(np.concatenate(c) for c in zip(*rows))

        rp, rs, ra = cat("read")
        wp, ws, wa = cat("write")
        pids = {pid for _, pid, _, _ in rec}
        launch = Launch(name, len(pids), int(np.unique(ra).size), int(np.unique(wa).size))
        bad = launch.violations

        for kind, parts in outside.items():
            out = np.unique(np.concatenate(parts)) if parts else ()
            if len(out):
                bad.append(f"{name}: {out.size} bytes {kind} outside every tensor argument: {_fmt(out)}")

        if wa.size:
            order = np.lexsort((ws, wa))  # by address, then program order
            a, p, s = wa[order], wp[order], ws[order]
            same = a[1:] == a[:-1]
            ww = np.unique(a[1:][same & (p[1:] != p[:-1])])
            if ww.size:
                bad.append(f"{name}: {ww.size} bytes written by more than one program: {_fmt(ww)}")
            first = np.concatenate(([True], ~same))
            ua, up, us = a[first], p[first], s[first]  # each written byte: its first writer and when
            if ra.size:
                i, hit = _lookup(ua, ra)
                cross = np.unique(ra[hit & (up[i] != rp)])
                if cross.size:
                    bad.append(f"{name}: {cross.size} bytes read by one program and written by another "
                               f"in the same launch: {_fmt(cross)}")
                raw = np.unique(ra[hit & (up[i] == rp) & (us[i] < rs)])
                if raw.size:
                    bad.append(f"{name}: {raw.size} bytes read back by the program that wrote them "
                               f"(no barrier orders them): {_fmt(raw)}")
        return launch

    # -- results -----------------------------------------------------------------------------

    def violations(self) -> list[str]:
        return [v for launch in self.launches for v in launch.violations]

    def assert_clean(self, allow_empty: bool = False) -> None:
        assert self.launches or allow_empty, "no kernel launch was recorded"
        bad = self.violations()
        assert not bad, "\n".join(bad)
