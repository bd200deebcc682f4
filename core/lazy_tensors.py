"""Tensors read one at a time, when they are needed: a checkpoint larger than memory is exported
tensor by tensor.

`LazyTensors` is a checkpoint's tensors as a read-only mapping. Its keys and every tensor's shape
and dtype (`meta(key)`) come from the files' headers; `lazy[key]` reads that one tensor. Every
engine's `read_checkpoint` returns one (core/engines/), so code that wants everything still
writes `dict(lazy)`.

`StandIns` let the ordinary module code of an export run on weights that are never all in memory.
A stand-in has a tensor's shape and dtype over a single element (a 1-element tensor expanded,
stride 0: a few bytes, and a storage of its own that identifies it), registered with the function
that reads its value. Modules are loaded with stand-ins (`load_state_dict(assign=True)`) and their
`hf_state_dict()`s rename, filter and compose them as usual, since they only pass tensors around;
the safetensors writer (core/models/hub.py) asks `value(t)` for each tensor as it writes it.
Arithmetic on a stand-in would compute on its placeholder element: `derived(fn, *inputs)` defers
it (LoRA merging, core/lora.py), and while stand-ins are active the writer refuses any tensor that
is not one, so a computation that slipped through fails instead of writing placeholder values.

The same stand-ins let fsdp train from Hugging Face checkpoints no rank reads whole: the loop
builds the task with stand-ins active, so `hub.load_state_dict` hands out stand-ins (with a
`read_rows` for safetensors), and the engine reads each rank's rows into its shards
(core/engines/fsdp.py read_into_shards). A previous run's weights (`task.init_from`) come the
same way: `assign(module, state)` gives the module stand-ins of them. Build-time code that
computes from weights calls `materialize(module)` first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch


class LazyTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, each read when asked for (`read(key)`); `meta(key)` is its shape
    and dtype as a meta tensor, known without reading it. `read_rows(key, start, stop)`, where
    the format allows it (safetensors), reads rows start..stop of dimension 0 alone."""

    def __init__(self, metas: dict[str, torch.Tensor], read: Callable[[str], torch.Tensor],
                 read_rows: Callable[[str, int, int], torch.Tensor] | None = None):  # fmt: skip
        self.metas, self._read, self.read_rows = metas, read, read_rows

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.metas:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.metas)

    def __len__(self) -> int:
        return len(self.metas)

    def meta(self, key: str) -> torch.Tensor:
        return self.metas[key]

    def merged(self, other: LazyTensors) -> LazyTensors:
        """Both: `other`'s tensors where both have a key."""
        mine = self

        def read(key: str) -> torch.Tensor:
            return other[key] if key in other.metas else mine[key]

        return LazyTensors({**self.metas, **other.metas}, read)


def metas(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Every tensor's shape and dtype without reading a lazy one."""
    return state.metas if isinstance(state, LazyTensors) else state


def as_meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


class StandIns:
    """The stand-ins of one export (see the module docstring); `with stand_ins.active():` makes
    the writer resolve them."""

    def __init__(self):
        # storage address -> (shape, dtype, read, the 1-element tensor keeping the address taken)
        self._reads: dict[int, tuple[torch.Size, torch.dtype, Callable, torch.Tensor]] = {}
        self._rows: dict[int, Callable[[int, int], torch.Tensor]] = {}  # where rows read alone
        self._order: dict[int, int] = {}  # where the order of reading matters (deferred_init)

    def stand_in(
        self,
        meta: torch.Tensor,
        read: Callable[[], torch.Tensor],
        read_rows: Callable[[int, int], torch.Tensor] | None = None,
        order: int = -1,
    ) -> torch.Tensor:
        """A stand-in for a tensor of `meta`'s shape and dtype whose value is `read()`;
        `read_rows(start, stop)`, if given, reads a range of its rows alone (into shards).
        Stand-ins are best read by ascending `order` (a replayed build completes them in it)."""
        fill = float("nan") if meta.is_floating_point() else 0
        # On the CPU explicitly: a default-device tensor would be deferred (core/deferred_init.py)
        one = torch.full((1,) * meta.dim(), fill, dtype=meta.dtype, device="cpu")
        self._reads[one.untyped_storage().data_ptr()] = (meta.shape, meta.dtype, read, one)
        if read_rows is not None:
            self._rows[one.untyped_storage().data_ptr()] = read_rows
        self._order[one.untyped_storage().data_ptr()] = order
        return one.expand(meta.shape)

    def from_lazy(self, lazy: LazyTensors) -> dict[str, torch.Tensor]:
        """A stand-in for every tensor of `lazy`, reading it (or its rows) from there."""
        rows = lazy.read_rows
        return {
            key: self.stand_in(lazy.meta(key), lambda k=key: lazy[k],
                               None if rows is None else lambda a, b, k=key: rows(k, a, b))
            for key in lazy
        }  # fmt: skip

    def rows(self, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop (dimension 0) of what `tensor` stands for, read alone where the
        source allows it, else cut from the whole tensor."""
        key = tensor.untyped_storage().data_ptr()
        if key in self._rows and self._reads[key][0] == tensor.shape:
            return self._rows[key](start, stop)
        return self.value(tensor)[start:stop].clone()  # a copy: the whole one is freed

    def order(self, tensor: torch.Tensor) -> int:
        return self._order[tensor.untyped_storage().data_ptr()]

    def is_stand_in(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in self._reads

    def value(self, tensor: torch.Tensor) -> torch.Tensor:
        """The real tensor `tensor` stands for (also through a reshape or detach of it)."""
        if not self.is_stand_in(tensor):
            raise ValueError(
                f"a {tuple(tensor.shape)} {tensor.dtype} tensor to be written is no stand-in: it "
                "was computed from one's placeholder (use lazy_tensors.derived for arithmetic on "
                "weights an export streams)"
            )
        shape, dtype, read, _ = self._reads[tensor.untyped_storage().data_ptr()]
        if tensor.numel() != shape.numel() or tensor.dtype != dtype:
            raise ValueError(f"a slice or cast of a {tuple(shape)} {dtype} stand-in cannot be read")
        value = read()
        if self.is_stand_in(value) or value.shape != shape or value.dtype != dtype:
            raise ValueError(f"read {tuple(value.shape)} {value.dtype} for a {tuple(shape)} "
                             f"{dtype} stand-in")  # fmt: skip
        return value.reshape(tensor.shape)

    @contextlib.contextmanager
    def active(self):
        global _active
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous


_active: StandIns | None = None


def active() -> StandIns | None:
    """The stand-ins in effect (`StandIns.active()`), if any."""
    return _active


def materialize(module: torch.nn.Module) -> None:
    """Read every stand-in weight of `module` now: for build-time code that computes from
    weights (resampling a position table, growing an embedding), which would otherwise compute
    from a stand-in's placeholder."""
    if _active is None:
        return
    read: dict[int, torch.nn.Parameter] = {}  # a tied weight is read once and stays tied
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if id(param) not in read and _active.is_stand_in(param):
                read[id(param)] = torch.nn.Parameter(_active.value(param), param.requires_grad)
            if id(param) in read:
                sub.register_parameter(name, read[id(param)])


def as_float(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """tensor.reshape(shape).float(); an active stand-in stays one (converted when read)."""
    if _active is None or not _active.is_stand_in(tensor):
        return tensor.reshape(shape).float()
    if tensor.dtype == torch.float32:
        view = tensor.reshape(shape)
        if _active.is_stand_in(view):  # a view of the stand-in, not a copy of its placeholder
            return view
    like = torch.empty(shape, dtype=torch.float32, device="meta")
    return derived(lambda t: t.reshape(shape).float(), tensor, like=like)


def assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`module`'s parameters become `state`'s tensors (every name of the module's state dict, in
    its shapes: e.g. fit_state's), without reading a stand-in: while stand-ins are active (an
    fsdp build) each rank later reads its rows alone. A tied parameter stays tied (the tensor of
    its first name for all of them); buffers are copied now (read: they are small)."""
    for names in tied_names(module):
        old = module.get_parameter(names[0])
        tensor = state[names[0]]
        if tensor.dtype != old.dtype:
            like = torch.empty(old.shape, dtype=old.dtype, device="meta")
            tensor = derived(lambda t, d=old.dtype: t.to(d), tensor, like=like)
        new = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        for name in names:
            set_parameter(module, name, new)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in state:
                buffer.copy_(current(state[name]).reshape(buffer.shape))


def tied_names(module: torch.nn.Module) -> list[list[str]]:
    """Every parameter's names, one list per parameter (a tied weight has several; the first is
    the one named_parameters and state dicts give)."""
    names_of: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return list(names_of.values())


def set_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    """Register `param` under the dotted `name` of `module`."""
    owner, _, attr = name.rpartition(".")
    module.get_submodule(owner).register_parameter(attr, param)


def current(tensor: torch.Tensor) -> torch.Tensor:
    """The value of `tensor`: what it stands for if it is an active stand-in, else itself."""
    if _active is not None and _active.is_stand_in(tensor):
        return _active.value(tensor)
    return tensor


def value(tensor: torch.Tensor) -> torch.Tensor:
    """What the writer writes for `tensor`: the tensor itself, or while stand-ins are active the
    value it stands for."""
    return tensor if _active is None else _active.value(tensor)


def derived(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, like: torch.Tensor):
    """fn(*inputs), computed now, or when any input is an active stand-in, a stand-in (shape and
    dtype of `like`) that computes it from their values when it is written."""
    if _active is None or not any(_active.is_stand_in(t) for t in inputs):
        return fn(*inputs)
    stand_ins = _active
    return stand_ins.stand_in(as_meta(like), lambda: fn(*(stand_ins.value(t) for t in inputs)))
