"""A second device on a CPU-only machine, for catching device mix-ups without a GPU.

``OffDevice`` is a torch dispatch mode (plus a function mode for the few factories that bypass dispatch) under
which tensors can live on "the other device": ``torch.device("meta")`` as far as their ``.device`` says, with
real CPU values inside (``Tagged``), so the engine's functions run end to end and give real answers. Every op
that mixes a tagged tensor with an untagged one raises ``DeviceMismatch``, with CUDA's exceptions: a 0-dim CPU
tensor may join any op (CUDA takes those as scalars), and a CPU index may index a tagged tensor (CUDA copies
it over). Moving data across (``.to(device)``, ``.cpu()``, ``.item()``, ``.tolist()``) works as on CUDA;
``.numpy()`` of a tagged tensor fails as it does for a CUDA tensor.

    with OffDevice() as dev:                 # dev == torch.device("meta")
        feats = to_other(feats_cpu)          # or to_other(module): parameters and buffers
        rows = rank_features(feats, ...)     # raises DeviceMismatch where CUDA would raise

A real meta tensor (no values) appearing under the mode is an error too: it means a factory slipped past.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

OTHER = torch.device("meta")
aten = torch.ops.aten

# CUDA lets a CPU index tensor index a CUDA tensor (it copies the index over); only the indexed tensor and the
# values put must be on the device.
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
              aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
# Cross-device by definition: the source may be anywhere.
_COPY_OPS = {aten.copy_.default, aten._to_copy.default, aten.copy.default}


class DeviceMismatch(RuntimeError):
    pass


class Tagged(torch.Tensor):
    """A CPU tensor that says it lives on ``OTHER``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", (type(elem), elem.device)
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=OTHER, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self):  # noqa: D105 - shows the values, for failing asserts
        return f"Tagged({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_other(device) -> bool:
    return device is not None and torch.device(device).type == OTHER.type  # "meta:0" too (TransformerLens adds an index)


def _describe(t: torch.Tensor) -> str:
    return f"{'other device' if isinstance(t, Tagged) else t.device.type} {t.dtype} {list(t.shape)}"


def _check(func, args, kwargs) -> bool:
    """Whether any tensor input is tagged; raises where CUDA would refuse the mix."""
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    for t in tensors:
        if not isinstance(t, Tagged) and t.device.type == OTHER.type:
            raise DeviceMismatch(f"{func}: a real meta tensor (no values) escaped the harness: {_describe(t)}")
    tagged = any(isinstance(t, Tagged) for t in tensors)
    if not tagged or func in _COPY_OPS:
        return tagged
    if func in _INDEX_OPS:
        self_t = args[0]
        values = list(args[2:3]) + ([kwargs["values"]] if "values" in kwargs else [])
        must = [self_t] + [v for v in values if isinstance(v, torch.Tensor)]
    else:
        must = tensors
    host = [t for t in must if not isinstance(t, Tagged) and t.dim() > 0]
    if host or (func in _INDEX_OPS and not isinstance(args[0], Tagged)):
        raise DeviceMismatch(
            f"{func} mixes devices: " + ", ".join(_describe(t) for t in tensors)
            + " (CUDA would raise: build the host tensor on the other tensor's device)")
    return True


def _wrap(x):
    return Tagged(x) if type(x) is torch.Tensor else x


def _dispatch(func, args, kwargs):
    tagged = _check(func, args, kwargs)
    target = kwargs.get("device")
    if _is_other(target):
        kwargs = {**kwargs, "device": torch.device("cpu")}
    unwrapped = {}

    def un(x):
        if isinstance(x, Tagged):
            unwrapped[id(x.elem)] = x
            return x.elem
        return x

    out = func(*tree_map(un, args), **tree_map(un, kwargs))
    if func is aten._to_copy.default and target is not None and not _is_other(target):
        return out  # .to("cpu"): a plain host tensor
    if func is aten.copy_.default and not isinstance(args[0], Tagged):
        return out  # host_tensor.copy_(tagged): stays on the host
    if not (tagged or _is_other(target)):
        return out

    def back(x):
        if isinstance(x, torch.Tensor) and id(x) in unwrapped:  # in place / out=: the caller's own tensor
            return unwrapped[id(x)]
        return _wrap(x)

    return tree_map(back, out)


class _Factories(TorchFunctionMode):
    """``torch.tensor(data, device=OTHER)`` and friends build the tensor below the dispatcher; build it on the
    host and move it (the move goes through dispatch)."""

    _FUNCS = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor, torch.asarray}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], Tagged):
            return args[0].elem.tolist()  # CUDA copies to the host for this
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and isinstance(args[0], Tagged):
            raise TypeError("can't convert a tensor on another device to numpy: use .cpu() first (as on CUDA)")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], Tagged):
            # Python lists and scalars in an index become tensors on the indexed tensor's device, built in C++
            # below the dispatcher (a real meta tensor here): build them on the host and move them, as CUDA has them.
            args = list(args)
            args[1] = _index_to_other(args[1])
            if func is torch.Tensor.__setitem__ and isinstance(args[2], (int, float, bool)):
                args[2] = torch.tensor(args[2], dtype=args[0].dtype).to(OTHER)
            return func(*args, **kwargs)
        if func in self._FUNCS:
            device = kwargs.get("device")
            if device is None and func is torch.Tensor.new_tensor and isinstance(args[0], Tagged):
                device = OTHER
            if device is None and func in (torch.as_tensor, torch.asarray) and isinstance(args[0], Tagged):
                dtype = kwargs.get("dtype")
                return args[0] if dtype is None else args[0].to(dtype)
            if _is_other(device):
                host = func(*args, **{**kwargs, "device": "cpu"})
                return host.to(OTHER)
        return func(*args, **kwargs)


def _index_to_other(index):
    if isinstance(index, tuple):
        return tuple(_index_to_other(i) for i in index)
    if isinstance(index, list):
        return torch.tensor(index).to(OTHER)
    return index


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class OffDevice:
    """Context manager: ``OTHER`` behaves as a second device while it is active."""

    def __enter__(self) -> torch.device:
        self._modes = [_Factories(), _Dispatch()]
        for m in self._modes:
            m.__enter__()
        return OTHER

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def to_other(x):
    """A tensor, or a module's parameters and buffers (in place), on the other device. Use under ``OffDevice``."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(OTHER)
    if isinstance(x, nn.Module):
        for mod in x.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = nn.Parameter(p.detach().to(OTHER), requires_grad=False)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = b.detach().to(OTHER)
        return x
    raise TypeError(type(x))


def is_other(t) -> bool:
    return isinstance(t, Tagged)
