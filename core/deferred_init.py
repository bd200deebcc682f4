"""Random initialisation without materialising the model, value for value what an eager build
gives.

Under fsdp no rank may hold the whole model, not even while it is built: a randomly initialised
tower (a SigLIP trained from scratch) would otherwise exist whole on every rank before it is
sharded. `DeferredInit.recording()` runs the task's build with every tensor it creates on the
CPU made on the meta device instead (no memory), and records each operation on those tensors in
order: the allocations, the initialisers (`normal_`, `uniform_`, `copy_`, ...), any arithmetic
(a sin-cos table). `value(t)` then replays the recording on the CPU, one operation at a time with
the random generator in the state the build started from, until `t` is complete (no later
operation touches its storage), and returns it. What replay passes and is not wanted again is
freed at once; a wanted tensor completed before it is asked for is kept until it is (read them
in `completion_order` and one is held at a time). Replaying the same operations in the same
order from the same generator state gives the eager build's values bit for bit, whatever the
engine or world size: random initialisation stays engine-independent.

Tensors the build makes on the meta device itself (a checkpoint's shapes, `from_pretrained`)
are not recorded: they are meta in an eager build too, and their operations draw no random
numbers there. `nn.init.trunc_normal_` returns early on meta tensors, so while recording it is
recorded as one call and replayed as one. Random draws on real tensors during the build would
interleave with the deferred ones in another order than an eager build's: refused
(`NotReplayable`), as is reading a value at build time (`.item()` on a meta tensor fails).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from . import lazy_tensors

aten = torch.ops.aten
_trunc_normal = torch.nn.init.trunc_normal_  # replayed as one call (it skips meta tensors)


class NotReplayable(RuntimeError):
    pass


def _key(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage (views and `.data` share it)."""
    return tensor.untyped_storage()._cdata


class _Call:
    """One recorded operation: `fn(*args, **kwargs)` as the eager build would have called it
    (meta tensors of the recording stand for their replayed values), producing `outs`."""

    __slots__ = ("fn", "args", "kwargs", "outs", "keys", "overwrites")

    def __init__(self, fn, args, kwargs, outs, keys, overwrites):
        self.fn, self.args, self.kwargs, self.outs, self.keys = fn, args, kwargs, outs, keys
        self.overwrites = overwrites  # the storage it fills whole without reading it, if any


# In-place fills that do not read what they fill (the initialisers).
_FILLS = {aten.normal_.default, aten.uniform_.default, aten.zero_.default, aten.fill_.Scalar,
          aten.copy_.default, aten.random_.default, getattr(aten.random_, "from"), aten.random_.to,
          aten.bernoulli_.float, aten.exponential_.default}  # fmt: skip


class DeferredInit:
    """A recorded build and its replay (see the module docstring)."""

    def __init__(self):
        self.calls: list[_Call] = []
        self.deferred: set[int] = set()  # storage keys of the tensors the recording made
        self.start_rng_state: torch.Tensor | None = None  # the generator as the build found it
        self.rng_state: torch.Tensor | None = None  # ... as the replay has left it
        self.foreign_draws: list[str] = []
        self.stand_ins = None
        self.replaying = False
        self._position = 0  # calls replayed so far
        self._real: dict[int, torch.UntypedStorage] = {}  # storage key -> its replayed storage
        self._last_use: dict[int, int] | None = None
        self._dead_after: dict[int, set[int]] = {}  # call -> storages overwritten before read
        self._wanted: dict[int, int] = {}  # storage key -> reads still to come (ties: several)
        self._done: dict[int, torch.UntypedStorage] = {}  # completed, wanted, not yet asked for

    def is_deferred(self, tensor: torch.Tensor) -> bool:
        return tensor.is_meta and _key(tensor) in self.deferred

    @contextlib.contextmanager
    def recording(self):
        """Build inside this: tensors the code makes on the CPU are deferred (meta, recorded)."""
        self.rng_state = self.start_rng_state = torch.get_rng_state()
        self.stand_ins = lazy_tensors.active()  # a copy from a checkpoint's stand-in: its value
        original = _trunc_normal

        @functools.wraps(original)
        def trunc_normal_(tensor, *args, **kwargs):
            if self.is_deferred(tensor):
                self._record(original, (tensor, *args), kwargs, tensor)
                return tensor
            return original(tensor, *args, **kwargs)

        global _recording
        torch.nn.init.trunc_normal_ = trunc_normal_
        previous, _recording = _recording, self
        try:
            recorder = _Recorder(self)
            with recorder, _DefaultToMeta(recorder):
                yield self
        finally:
            torch.nn.init.trunc_normal_ = original
            _recording = previous
        if not self.foreign_draws and not torch.equal(torch.get_rng_state(), self.start_rng_state):
            self.foreign_draws.append("the generator was reseeded or its state set")
        if self.foreign_draws:
            raise NotReplayable(
                "the build drew random numbers on real tensors "
                f"({', '.join(sorted(set(self.foreign_draws)))}) while others were deferred: "
                "replay could not give the eager build's values. Make those tensors on the "
                "CPU default device (deferred too) or draw them after the build"
            )

    def _record(self, fn, args, kwargs, outs) -> None:
        metas = [t for t in tree_flatten((args, kwargs, outs))[0]
                 if isinstance(t, torch.Tensor) and t.is_meta]  # fmt: skip
        for t in tree_flatten(outs)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                self.deferred.add(_key(t))
        if any(not self.is_deferred(t) for t in metas):
            raise NotReplayable(
                f"{getattr(fn, '__name__', fn)} mixes deferred tensors with ones the build made "
                "on the meta device itself: replay has no values for those"
            )
        overwrites = None
        target = args[0] if args else None
        if (
            (fn in _FILLS or fn is _trunc_normal)
            and self.is_deferred(target)
            and (
                target.is_contiguous()
                and target.numel() * target.element_size() == target.untyped_storage().nbytes()
                and not any(
                    isinstance(t, torch.Tensor) and t.is_meta and _key(t) == _key(target)
                    for t in tree_flatten((args[1:], kwargs))[0]
                )  # fmt: skip
            )
        ):
            overwrites = _key(target)
        self.calls.append(
            _Call(fn, args, kwargs, outs, frozenset(_key(t) for t in metas), overwrites)
        )

    def want(self, tensors) -> None:
        """The tensors `value` will be asked for: kept when replay completes them early."""
        for t in tensors:
            self._wanted[_key(t)] = self._wanted.get(_key(t), 0) + 1

    def completion_order(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """`tensors`' names in the order replay completes them (read them in it: one is held
        at a time)."""
        last = self._last_uses()
        return sorted(tensors, key=lambda name: last.get(_key(tensors[name]), -1))

    def _last_uses(self) -> dict[int, int]:
        if self._last_use is None:
            self._last_use, self._dead_after = {}, {}
            for i, call in enumerate(self.calls):
                for key in call.keys:
                    previous = self._last_use.get(key)
                    if call.overwrites == key and previous is not None:
                        # Its value from before is not read again (an initialiser overwrites
                        # what the module's own constructor drew): freed in between, as an
                        # eager build could not, or replay would hold a tower until a
                        # model-wide re-initialisation reaches each of its weights.
                        self._dead_after.setdefault(previous, set()).add(key)
                    self._last_use[key] = i
        return self._last_use

    def value(self, tensor: torch.Tensor) -> torch.Tensor:
        """The value the eager build would have given the deferred `tensor` (a CPU tensor)."""
        key = _key(tensor)
        if key not in self.deferred:
            raise ValueError(f"a {tuple(tensor.shape)} tensor the recording did not make")
        last = self._last_uses()
        if key not in self._done:
            if key not in self._wanted or last[key] < self._position:
                raise ValueError(
                    "value() of a deferred tensor not announced with want(), or "
                    "asked for more often than announced"
                )
            self._replay_until(last[key])
        storage = self._done[key]
        self._wanted[key] -= 1
        if not self._wanted[key]:  # its last read: freed
            del self._done[key], self._wanted[key]
        return _view(storage, tensor)  # the replay's storage, now the caller's alone

    def _replay_until(self, stop: int, keep: bool = False) -> None:
        """Replay the calls up to `stop`, freeing what is complete or overwritten later (all
        kept with `keep`: materialize)."""
        saved = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        last = self._last_uses()
        self.replaying = True  # not recorded, when mid-build (materialize)
        try:
            with torch.no_grad():
                while self._position <= stop:
                    i, call = self._position, self.calls[self._position]
                    if call.overwrites is not None and call.overwrites not in self._real:
                        nbytes = call.args[0].untyped_storage().nbytes()
                        self._real[call.overwrites] = torch.UntypedStorage(nbytes)
                    self._run(call)
                    self._position += 1
                    if keep:
                        continue
                    dead = self._dead_after.get(i, ())
                    for key in call.keys:
                        if last[key] == i:  # complete: no later call touches it
                            storage = self._real.pop(key, None)
                            if key in self._wanted and storage is not None:
                                self._done[key] = storage
                        elif key in dead:
                            del self._real[key]
            self.rng_state = torch.get_rng_state()
        finally:
            torch.set_rng_state(saved)
            self.replaying = False

    def _run(self, call: _Call) -> None:
        def real(t):
            if isinstance(t, torch.Tensor) and t.is_meta and _key(t) in self._real:
                return _view(self._real[_key(t)], t)
            if isinstance(t, torch.Tensor) and t.is_meta and _key(t) in self.deferred:
                raise NotReplayable(
                    f"{getattr(call.fn, '__name__', call.fn)} reads a deferred tensor replay "
                    "has freed (kept by the build past a materialize(), outside the module)"
                )
            if isinstance(t, torch.Tensor) and self.stand_ins and self.stand_ins.is_stand_in(t):
                return self.stand_ins.value(t)
            if isinstance(t, torch.device) and t.type == "meta":
                return torch.device("cpu")
            return t

        args, kwargs = tree_map(real, call.args), tree_map(real, call.kwargs)
        outs = call.fn(*args, **kwargs)
        metas, reals = tree_flatten(call.outs)[0], tree_flatten(outs)[0]
        for meta, value in zip(metas, reals, strict=True):
            if isinstance(meta, torch.Tensor) and meta.is_meta and _key(meta) not in self._real:
                self._real[_key(meta)] = value.untyped_storage()

    def finish(self) -> None:
        """After every wanted tensor was read: replay the rest (random draws the eager build
        made for tensors nobody asked for: a module replaced later in the build) and leave the
        global generator where an eager build leaves it."""
        if self.calls:
            self._replay_until(len(self.calls) - 1)
            torch.set_rng_state(self.rng_state)
        self._real.clear()
        self._done.clear()


_recording: DeferredInit | None = None
_deferring = False


@contextlib.contextmanager
def deferring():
    """Inside (with stand-ins active: an engine that loads into shards), `build_task` builds
    deferred and hands its tensors out as stand-ins (`build`)."""
    global _deferring
    previous, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = previous


@contextlib.contextmanager
def build():
    """Context for the construction of a task: recorded when `deferring()` is in effect (yields
    the DeferredInit, else None)."""
    if not _deferring:
        yield None
        return
    deferred = DeferredInit()
    with deferred.recording():
        yield deferred


def hand_out(module: torch.nn.Module, deferred: DeferredInit, stand_ins) -> None:
    """Every deferred parameter and buffer of `module` becomes a stand-in (core/lazy_tensors.py)
    that replays its value when read, ordered by completion (`StandIns.order`): the engine then
    reads each rank's rows of it as it reads a checkpoint's. A tied weight stays one."""
    last = deferred._last_uses()

    def stand_in(t: torch.Tensor) -> torch.Tensor:
        deferred.want([t])
        read = functools.partial(deferred.value, t)
        return stand_ins.stand_in(lazy_tensors.as_meta(t), read, order=last[_key(t)])

    _replace_deferred(module, deferred, stand_in)


def materialize(module: torch.nn.Module) -> None:
    """Give `module`'s deferred parameters and buffers their values now, while the build is
    being recorded: for build code that computes from the values (stage 4's reference copy and
    model digest), which then holds the module whole, as an eager build does. Later calls of
    the build are recorded and replayed as before, from where this replay left the generator."""
    deferred = _recording
    if deferred is None or not any(deferred.is_deferred(t) for t in _tensors(module)):
        return
    deferred._last_use = None  # the calls so far: more will be recorded
    deferred._replay_until(len(deferred.calls) - 1, keep=True)
    real = deferred._real
    _replace_deferred(module, deferred, lambda t: _view(real[_key(t)], t))
    deferred._real = {}  # the module holds them now; later calls touch the real tensors
    deferred._last_use = None


def _tensors(module: torch.nn.Module):
    for sub in module.modules():
        yield from (t for t in [*sub._parameters.values(), *sub._buffers.values()] if t is not None)


def _replace_deferred(module: torch.nn.Module, deferred: DeferredInit, make) -> None:
    """Each deferred parameter and buffer of `module` replaced by `make(t)` (as a parameter
    where it was one); a tied weight stays one tensor under all its names."""
    given: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                if t is None or not deferred.is_deferred(t):
                    continue
                if id(t) not in given:
                    new = make(t)
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    given[id(t)] = new
                store[name] = given[id(t)]


def has_values(tensor: torch.Tensor) -> bool:
    """Whether `tensor` has values, or will (deferred): build code that skips work on the meta
    device (`vlscale plan` builds for shapes only) asks this instead of `is_meta`."""
    return not tensor.is_meta or (_recording is not None and _recording.is_deferred(tensor))


def _view(storage: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype, device="cpu").set_(
        storage, like.storage_offset(), like.shape, like.stride()
    )


_DEFERRED_FACTORIES = {
    torch.empty,
    torch.empty_strided,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.arange,
    torch.range,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
}  # not torch.tensor / as_tensor: their values come from Python data (constants stay real)


class _DefaultToMeta(TorchFunctionMode):
    """Factories called without a device (the CPU by default) make meta tensors, and say so to
    the recorder; an explicit device (a stand-in's placeholder, `torch.device("meta")` inside
    the build) is kept."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.recorder.owner.replaying:
            return func(*args, **kwargs)
        if func in _DEFERRED_FACTORIES and kwargs.get("device") is None:
            self.recorder.making += 1
            try:
                return func(*args, **{**kwargs, "device": torch.device("meta")})
            finally:
                self.recorder.making -= 1
        return func(*args, **kwargs)


class _Recorder(TorchDispatchMode):
    """Records every operation that touches a deferred tensor, and makes the tensors
    `_DefaultToMeta` redirects deferred (see DeferredInit)."""

    def __init__(self, owner: DeferredInit):
        super().__init__()
        self.owner = owner
        self.making = 0  # inside a redirected factory

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if owner.replaying:
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if self.making and not tensors:  # the factory's allocation: replayed on the CPU
            out = func(*args, **kwargs)
            owner._record(func, args, kwargs, out)
            return out
        if not any(owner.is_deferred(t) for t in tensors):
            if torch.Tag.nondeterministic_seeded in func.tags and any(
                not t.is_meta for t in tensors
            ):
                owner.foreign_draws.append(str(func))
            return func(*args, **kwargs)
        # Real inputs beside deferred ones (a constant made on the CPU): meta for this run,
        # themselves in the replay.
        meta_args, meta_kwargs = tree_map(_as_meta, (args, kwargs))
        out = func(*meta_args, **meta_kwargs)
        owner._record(func, args, kwargs, out)
        return out


def _as_meta(t):
    if isinstance(t, torch.Tensor) and not t.is_meta:
        return t.to("meta")
    return t
