"""The safe model format's object tree: estimators, torch modules, arrays and plain data to a
JSON-able tree plus named arrays (:class:`Encoder`), and back (:class:`Decoder`), instantiating
only the classes it is given. The file around it (the ``.npz``, the document, its versions, the
admitted classes) is :mod:`featlearn.persistence`'s.
"""

from __future__ import annotations

import collections

import numpy as np

#: The entry of the ``.npz`` holding the JSON document.
JSON_KEY = "__featlearn__.json"


class NotSafe(TypeError):
    """A value the safe format cannot hold (raised at save time, with its attribute path)."""


def _module_internals():
    import torch

    return frozenset(vars(torch.nn.Module()))


def _is_plain_key(k):
    return isinstance(k, str) and k != "__type__"


class Encoder:
    """Object tree -> JSON-able tree; arrays go to ``self.arrays`` and are referenced by key."""

    def __init__(self, arrays, names):
        self.arrays = arrays
        self.names = names  # {class: name in the file}
        self.active = set()

    def add(self, array):
        key = f"a{len(self.arrays)}"
        self.arrays[key] = array
        return key

    def encode(self, obj, where):
        if obj is None or type(obj) in (bool, int, float, str):
            return obj
        if id(obj) in self.active:
            raise NotSafe(f"{where} refers back to an object that contains it")
        self.active.add(id(obj))
        try:
            return self._encode(obj, where)
        finally:
            self.active.discard(id(obj))

    def _encode(self, obj, where):
        t = type(obj)
        if t is list:
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if t is tuple:
            return {"__type__": "tuple", "items": [self.encode(v, f"{where}[{i}]")
                                                   for i, v in enumerate(obj)]}
        if t in (set, frozenset):
            return {"__type__": t.__name__, "items": [self.encode(v, f"{where}{{}}") for v in obj]}
        if t is dict and all(_is_plain_key(k) for k in obj):
            return {k: self.encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
        if t in (dict, collections.OrderedDict):  # non-str keys, or an OrderedDict
            return {"__type__": "dict", "ordered": t is not dict,
                    "items": [[self.encode(k, f"{where} key {k!r}"),
                               self.encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
        if t in (np.ndarray, np.memmap):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise NotSafe(f"{where} is an array of dtype {obj.dtype}")
            return {"__type__": "ndarray", "key": self.add(np.asarray(obj))}
        if isinstance(obj, np.generic) and t.__module__ == "numpy":
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise NotSafe(f"{where} is a numpy scalar of dtype {obj.dtype}")
            return {"__type__": "npscalar", "key": self.add(np.asarray(obj))}
        if isinstance(obj, np.dtype):
            if obj.hasobject or obj.fields is not None:
                raise NotSafe(f"{where} is the dtype {obj}")
            return {"__type__": "dtype", "str": obj.str}
        if t.__module__.startswith("torch"):
            out = self._encode_torch(obj, where)
            if out is not None:
                return out
        if t in self.names:
            name = self.names[t]
            if _is_module(obj):
                return self._encode_module(obj, name, where)
            return self._encode_estimator(obj, name, where)
        raise NotSafe(f"{where} is a {t.__module__}.{t.__qualname__}, which the safe model "
                       "format does not hold")

    def _encode_torch(self, obj, where):
        import torch

        if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
            if obj.layout != torch.strided or obj.is_quantized:
                raise NotSafe(f"{where} is a {obj.layout} tensor")
            # a copy if on a GPU: the caller's tensor is untouched
            t = obj.detach().to("cpu").contiguous()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep its exact bits
                arr = t.view(torch.int16).numpy().view(np.uint16)
            else:
                try:
                    arr = t.numpy()
                except (TypeError, RuntimeError):
                    raise NotSafe(f"{where} is a tensor of dtype {t.dtype}") from None
            return {"__type__": "tensor", "key": self.add(arr),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "parameter": type(obj) is torch.nn.Parameter,
                    "requires_grad": bool(obj.requires_grad)}
        if isinstance(obj, torch.dtype):
            return {"__type__": "torch.dtype", "name": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"__type__": "torch.device", "str": str(obj)}
        if type(obj) is torch.Size:
            return {"__type__": "torch.Size", "items": [int(v) for v in obj]}
        return None

    def _state(self, obj):
        getter = getattr(obj, "__featlearn_getstate__", None) or obj.__getstate__
        state = getter()  # the class decides what is transient (e.g. a generator)
        if state is None:
            return {}
        if not isinstance(state, dict):
            raise NotSafe(f"{type(obj).__qualname__}.__getstate__ returned a "
                           f"{type(state).__name__}")
        return state

    def _encode_estimator(self, obj, name, where):
        state = self._state(obj)
        try:
            names = set(obj._get_param_names())
        except Exception:
            names = set()
        params = {k: v for k, v in state.items() if k in names}
        rest = {k: v for k, v in state.items() if k not in names}
        for k in list(params) + list(rest):
            if not isinstance(k, str):
                raise NotSafe(f"{where} has an attribute named {k!r}")
        return {"__type__": "object", "class": name,
                "params": {k: self.encode(v, f"{where}.{k}") for k, v in params.items()},
                "state": {k: self.encode(v, f"{where}.{k}") for k, v in rest.items()}}

    def _encode_module(self, obj, name, where):
        state = self._state(obj)
        internal = _module_internals()
        out = {"__type__": "module", "class": name, "training": bool(state.get("training", True)),
               "parameters": {}, "buffers": {}, "modules": {},
               "non_persistent": sorted(state.get("_non_persistent_buffers_set", ())), "attrs": {}}
        for k, v in state.items():
            if k in ("training", "_non_persistent_buffers_set"):
                continue
            if k in ("_parameters", "_buffers", "_modules"):
                out[k[1:]] = {n: self.encode(m, f"{where}.{n}") for n, m in v.items()}
            elif k in internal:
                if v:
                    raise NotSafe(f"{where} has hooks ({k}), which the safe format does not hold")
            else:
                out["attrs"][k] = self.encode(v, f"{where}.{k}")
        return out


def _is_module(obj):
    import torch

    return isinstance(obj, torch.nn.Module)


class Decoder:
    """JSON tree + arrays -> objects; only the given ``classes`` are instantiated."""

    def __init__(self, arrays, classes):
        self.arrays = arrays
        self.classes = classes  # {name in the file: class}

    def array(self, node):
        key = node["key"]
        if not isinstance(key, str) or key == JSON_KEY or key not in self.arrays:
            raise KeyError(f"array {key!r} is missing")
        return self.arrays[key]

    def decode(self, node):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            raise TypeError(f"unexpected JSON value {node!r}")
        kind = node.get("__type__")
        if kind is None:
            return {k: self.decode(v) for k, v in node.items()}
        if kind == "tuple":
            return tuple(self.decode(v) for v in node["items"])
        if kind in ("set", "frozenset"):
            return (set if kind == "set" else frozenset)(self.decode(v) for v in node["items"])
        if kind == "dict":
            cls = collections.OrderedDict if node.get("ordered") else dict
            return cls((self.decode(k), self.decode(v)) for k, v in node["items"])
        if kind == "ndarray":
            return self.array(node)
        if kind == "npscalar":
            return self.array(node)[()]
        if kind == "dtype":
            return np.dtype(str(node["str"]))
        if kind == "tensor":
            return self.tensor(node)
        if kind == "torch.dtype":
            import torch

            dtype = getattr(torch, str(node["name"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {node['name']!r}")
            return dtype
        if kind == "torch.device":
            import torch

            return torch.device(str(node["str"]))
        if kind == "torch.Size":
            import torch

            return torch.Size([int(v) for v in node["items"]])
        if kind in ("object", "module"):
            return self.instance(node, kind)
        raise ValueError(f"unknown entry type {kind!r}")

    def tensor(self, node):
        import torch

        arr = self.array(node)
        dtype = getattr(torch, str(node["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {node['dtype']!r}")
        if dtype == torch.bfloat16:
            if arr.dtype != np.uint16:
                raise ValueError("a bfloat16 tensor must be stored as uint16")
            t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(arr)
            if t.dtype != dtype:
                raise ValueError(f"tensor stored as {arr.dtype} but recorded as {dtype}")
        if node.get("parameter"):
            return torch.nn.Parameter(t, requires_grad=bool(node.get("requires_grad", True)))
        return t.requires_grad_(bool(node.get("requires_grad", False)))

    def instance(self, node, kind):
        name = node["class"]
        cls = self.classes.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"class {name!r} is not one a featlearn model may contain")
        if (kind == "module") != _is_module_class(cls):
            what = "torch module" if kind == "module" else "estimator"
            raise ValueError(f"class {name!r} is not a {what}")
        obj = cls.__new__(cls)
        if kind == "module":
            import torch

            torch.nn.Module.__init__(obj)
            obj.__dict__.update({k: self.decode(v) for k, v in node["attrs"].items()})
            obj.training = bool(node["training"])
            for key in ("parameters", "buffers", "modules"):
                getattr(obj, f"_{key}").update({k: self.decode(v) for k, v in node[key].items()})
            obj._non_persistent_buffers_set = set(node["non_persistent"])
            return obj
        state = {k: self.decode(v) for k, v in node["params"].items()}
        state.update({k: self.decode(v) for k, v in node["state"].items()})
        restore = (getattr(obj, "__featlearn_setstate__", None)
                   or getattr(obj, "__setstate__", None))
        if restore is not None:
            restore(state)  # the class's own restore (e.g. rebuilding a generator)
        else:
            obj.__dict__.update(state)
        return obj


def _is_module_class(cls):
    import torch

    return issubclass(cls, torch.nn.Module)
