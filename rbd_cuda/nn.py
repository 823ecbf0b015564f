"""Training in a fixed random subspace by reparametrisation: θ = θ₀ + P c with only c trainable.

Li et al. (2018), "Measuring the intrinsic dimension of objective landscapes": the D parameters
θ of a network are replaced by θ₀ + P c, θ₀ the (frozen) initialisation, P a fixed D×d random
matrix and c ∈ R^d the only trainable vector, started at 0. ``RandomSubspace`` wraps a module that
way. P is never stored: the forward pass computes P c with ``rbd_cuda.expand`` and the backward
pass Pᵀ ∂L/∂θ with ``rbd_cuda.project`` (the derivative registered for ``expand`` in ``ops.py``),
both regenerating P's entries from Philox.

Compartments and normalisation follow ``rbd_cuda.optim.FPD`` exactly (the same planner,
``rbd_cuda.layout``, the same stream ids, row offsets and scale s, ``rbd_cuda.basis``), with each
basis vector multiplied by √s:

    θ_k = θ₀_k + √s_k · P_k c_k      (compartment k, its own stream id k, step 0)

so that plain SGD with learning rate lr on c moves θ exactly as ``FPD(lr, normalize=...)`` does
(docs/subspace.md derives the mapping; tests/test_nn.py checks it).
"""

from __future__ import annotations

import copy
import inspect
import json
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .basis import Basis, check_distribution, check_normalize, check_seed, expand_segments, scale
from .layout import check_saved, layer_of, plan, split_name
from .ops import SegmentPlan

__all__ = ["RandomSubspace", "SubspaceCompartment"]

# The configuration's layout in the state dict: JSON in a uint8 tensor (a state dict of tensors
# only, which safetensors needs), each compartment and segment a dict. Format 1 (fcd40d6 and
# before: a dict as extra state, tied θ₀ under each name) is no longer read: nothing committed
# holds one (docs/formats.md).
CONFIG_FORMAT = 2
# Methods of the wrapped module that would use θ₀ rather than θ₀ + P c (the module's weights are θ₀
# buffers; θ₀ + P c exists only inside the wrapper's forward) or fail obscurely (transformers reads
# the device from the first parameter, and the module has none): they raise instead.
NEEDS_EXPORT = ("save_pretrained", "push_to_hub", "generate")
# Values in "the saved configuration differs" messages, shortened (a layout can be long).
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40
_SHORT.maxlist = _SHORT.maxdict = 3
_SHORT.maxlevel = 2


class _SignedForward:
    """``RandomSubspace.forward``: the wrapper's ``_forward`` bound to the wrapper, with the wrapped
    module's signature. A plain ``forward(*args, **kwargs)`` hides it, and the HF Trainer, which
    keeps only the dataset columns the model's forward names, would drop them all. A non-data
    descriptor, so that frameworks can still assign ``wrapper.forward`` (accelerate's autocast)."""

    def __get__(self, wrapper, owner=None):
        return owner._forward if wrapper is None else _BoundForward(wrapper)


class _BoundForward:
    """A bound ``RandomSubspace._forward`` whose ``__signature__`` is the wrapped module's forward's."""

    __slots__ = ("__self__",)

    def __init__(self, wrapper: RandomSubspace):
        self.__self__ = wrapper

    @property
    def __func__(self):  # what frameworks rebind after wrapping it (accelerate's autocast)
        return RandomSubspace._forward

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__self__.module.forward)

    def __call__(self, *args, **kwargs):
        return self.__self__._forward(*args, **kwargs)


@dataclass(frozen=True)
class SubspaceCompartment:
    """One basis: stream ``stream``, coefficients ``c[offset : offset + dim]``, and its segments as
    ``(parameter name, start, numel, row_offset)``: ``param.view(-1)[start : start + numel]`` is
    rows ``row_offset …`` of the compartment's matrix."""

    name: str
    stream: int
    dim: int
    numel: int
    offset: int
    segments: tuple[tuple[str, int, int, int], ...]


class RandomSubspace(nn.Module):
    """Wraps ``module`` so that its trainable parameters are θ₀ + P c, with c the only trainable
    parameter (plus one scale λ per layer with ``said=True``).

    Args:
        module: the network. It is modified in place: each trainable parameter is replaced by a
            buffer of the same name holding θ₀ (its current value; no copy is made), so the
            wrapper's ``parameters()`` are c (and λ) alone and its ``state_dict`` holds θ₀, c, λ.
            Parameters with ``requires_grad=False`` stay frozen parameters, outside the subspace.
        dim: directions per compartment (int), or ``Fixed``, ``Proportional(total)`` or
            ``Compression(factor, minimum)`` from ``rbd_cuda.layout``, as for ``FPD``.
        seed: 64-bit seed of the bases. Compartment k draws its basis from stream k at step 0,
            the stream ``FPD`` with the same seed and compartments uses.
        distribution: ``"normal"``, ``"uniform"`` or ``"rademacher"`` entries.
        compartments: ``"global"`` (one basis for all parameters, Li et al.), ``"tensor"``,
            ``"layer"``, an int (blocks of at most that many entries) or a list of lists of the
            module's parameters: one basis (and one slice of c) per compartment.
        normalize: basis vectors are multiplied by √s, s as in ``rbd_cuda.optim.RBD``
            (``rbd_cuda.basis.NORMALIZATIONS``): ``"unbiased"`` s = 1/(d σ²) (E[P Pᵀ]·s = I: SGD
            on c is SGD on θ in expectation), ``"paper"`` s = 1/D (columns of about unit length,
            Li et al.'s normalised P), ``"dim"`` s = 1/d, ``"none"`` s = 1, ``"projection"``
            s = 1/(n σ²) (n: the compartment's entries).
        said: Aghajanyan et al.'s structure-aware variant (SAID): one extra trainable scalar λ_l
            per layer l (parameters sharing a module), θ_l = θ₀_l + λ_l √s P c restricted to the
            layer's rows; λ starts at 1. The layers are those of ``compartments="layer"``.

    ``forward`` takes what the module's forward takes, and runs ``module`` with θ₀ + P c through
    ``torch.func.functional_call``; ``inspect.signature(wrapper.forward)`` is the module's (the HF
    Trainer reads it to keep the dataset's columns). ``export()`` returns a plain copy of the module
    with those weights as ordinary parameters (use its ``save_pretrained``/``generate``:
    ``self.module`` holds θ₀, and its ``generate``, also reached as ``wrapper.generate``, refuses,
    pointing to ``export``). ``state_dict()`` holds tensors only: θ₀ (each tied parameter once), c, λ, and
    ``subspace_config()`` (seed, distribution, normalisation, SAID flag, layout) as JSON in a uint8
    tensor. ``load_state_dict`` checks all of it before changing anything and refuses a state saved
    by a wrapper built otherwise, naming the first differing field. c and λ stay fp32 through
    dtype conversions (``.half()``, ``.to(dtype)``).
    """

    def __init__(self, module: nn.Module, dim, *, seed: int = 0, distribution: str = "normal",
                 compartments="global", normalize: str = "unbiased", said: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"rbd_cuda: module must be a torch.nn.Module, got {type(module).__name__}")
        seed = check_seed(seed)
        check_distribution(distribution)
        check_normalize(normalize)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("rbd_cuda: module has no trainable parameters (none with requires_grad=True) "
                             "to reparametrise")
        for name, p in named:
            if not p.is_floating_point() or p.dtype == torch.float64:
                raise ValueError(f"rbd_cuda: parameter {name} has dtype {p.dtype}; the subspace ops take "
                                 "float32, float16 or bfloat16")

        # The planner's layout, with each segment naming its parameter instead of holding it (the
        # parameters are about to leave the module; θ₀ buffers may later move with .to()).
        self.compartments: list[SubspaceCompartment] = []
        offset = 0
        for comp in plan(named, compartments, dim):
            segments = tuple((s.name, s.start, s.numel, s.row_offset) for s in comp.segments)
            self.compartments.append(SubspaceCompartment(comp.name, comp.stream, comp.dim, comp.numel, offset,
                                                         segments))
            offset += comp.dim
        self.seed, self.distribution, self.normalize = seed, distribution, normalize
        segments = [(comp, segment) for comp in self.compartments for segment in comp.segments]
        self._segment_names = [(name, start) for _, (name, start, _, _) in segments]
        self._table = SegmentPlan([numel for _, (_, _, numel, _) in segments], [row for _, (_, _, _, row) in segments],
                                  list(range(len(segments))), [comp.dim for comp, _ in segments],
                                  [comp.stream for comp, _ in segments])
        self.numel = sum(p.numel() for _, p in named)
        self.dim = offset

        # Every attribute path of each parameter (tied weights have several): θ₀ replaces all of them.
        paths: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            paths.setdefault(id(p), []).append(name)
        self._names = [name for name, _ in named]
        self._aliases = {name: paths[id(p)] for name, p in named}
        self._shapes = {name: p.shape for name, p in named}
        # The optimizers' s, so the SGD-vs-FPD mapping is exact.
        self._sqrt_scale = [scale(normalize, distribution, comp.dim, comp.numel, self.numel, root=True)
                            for comp in self.compartments]

        self.said = said
        self._layers = list(dict.fromkeys(layer_of(n) for n in self._names))
        self._layer_index = {n: self._layers.index(layer_of(n)) for n in self._names}

        self.c = nn.Parameter(torch.zeros(self.dim, dtype=torch.float32, device=named[0][1].device))
        self.lambdas = (nn.Parameter(torch.ones(len(self._layers), dtype=torch.float32, device=self.c.device))
                        if said else None)

        for name, p in named:
            theta0 = p.detach()  # the parameter's storage, not a copy
            for alias in self._aliases[name]:
                owner, attr = split_name(alias)
                owner = module.get_submodule(owner)
                delattr(owner, attr)
                # One tensor object under every alias (functional_call ties the aliases by identity),
                # saved once: safetensors refuses two names for one storage.
                owner.register_buffer(attr, theta0, persistent=alias == name)
        for method in NEEDS_EXPORT:
            if callable(getattr(module, method, None)):
                setattr(module, method, _NeedsExport(method))
        if "generate" in module.__dict__:
            # A Seq2SeqTrainer calls model.generate: through the wrapper it refuses as the module's does.
            self.generate = module.generate
        self.module = module
        # load_state_dict(assign=True) replaces θ₀ under its saved (first) name only.
        self.register_load_state_dict_post_hook(_retie_after_load)

    def subspace_config(self) -> dict:
        """Everything besides c, λ and θ₀ that decides the weights, as plain values: saved in
        ``state_dict()`` and checked by ``load_state_dict``. (Not ``config``: training frameworks
        read ``model.config`` as a transformers configuration.)"""
        return {"format": CONFIG_FORMAT, "seed": self.seed, "distribution": self.distribution,
                "normalize": self.normalize, "said": self.said,
                "compartments": [{"stream": c.stream, "dim": c.dim, "numel": c.numel,
                                  "segments": [{"param": name, "start": start, "numel": numel, "row_offset": row}
                                               for name, start, numel, row in c.segments]}
                                 for c in self.compartments]}

    def get_extra_state(self) -> torch.Tensor:
        # A tensor, not a dict: safetensors (the only format transformers 5 writes) takes tensors only.
        text = json.dumps(self.subspace_config(), sort_keys=True, separators=(",", ":"))
        return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self._check_config(_read_config(state, "_extra_state"))

    def _check_config(self, saved: dict) -> None:
        here = self.subspace_config()
        del here["format"]
        check_saved(saved, here, "this RandomSubspace state was saved by a wrapper built with other arguments, "
                    "whose weights differ")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # torch hands every module strict=True and checks the keys only after loading them all:
        # remembering the caller's strict lets the wrapper refuse missing or unexpected entries
        # before anything changes.
        self._strict_load = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            del self._strict_load

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Called first for this wrapper (before its module's θ₀ buffers), so everything it checks is
        # checked before anything of the wrapper changes: a refused state leaves it as it was.
        if any(key.startswith(prefix) for key in state_dict):
            self._check_state(state_dict, prefix, getattr(self, "_strict_load", None),
                              local_metadata.get("assign_to_params_buffers", False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_state(self, state: dict, prefix: str, strict: bool | None, assign: bool) -> None:
        """Validates the wrapper's part of ``state`` (keys under ``prefix``): the configuration,
        which keys are there (with ``strict``; None when a parent module's load_state_dict runs,
        which checks them after loading), and each tensor's type, shape, dtype and finiteness."""
        config_key = prefix + "_extra_state"
        if config_key not in state:
            raise ValueError(f"rbd_cuda: the state has no {config_key!r}, the RandomSubspace configuration (seed, "
                             "distribution, normalisation, compartments) that its c belongs to; it is required "
                             "even with strict=False")
        self._check_config(_read_config(state[config_key], config_key))
        expected = {prefix + key: value for key, value in self.state_dict(keep_vars=True).items()
                    if key != "_extra_state"}
        if strict:
            missing = [key for key in expected if key not in state]
            unexpected = [key for key in state if key.startswith(prefix) and key not in expected
                          and key != config_key]
            wrong = ([f"lacks {_SHORT.repr(missing)}"] if missing else []) + \
                ([f"has unexpected entries {_SHORT.repr(unexpected)}"] if unexpected else [])
            if wrong:
                raise ValueError("rbd_cuda: the RandomSubspace state " + " and ".join(wrong) + " (strict=True)")
        coefficients = {prefix + "c", prefix + "lambdas"}
        theta0 = {f"{prefix}module.{name}" for name in self._names}
        for key, target in expected.items():
            if key not in state:
                continue
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"rbd_cuda: state entry {key!r} must be a tensor, got {type(value).__name__}")
            if value.shape != target.shape:
                raise ValueError(f"rbd_cuda: state entry {key!r} has shape {tuple(value.shape)}, this wrapper's "
                                 f"{tuple(target.shape)}")
            if value.is_floating_point() != target.is_floating_point():
                raise ValueError(f"rbd_cuda: state entry {key!r} has dtype {value.dtype}, this wrapper's {target.dtype}")
            if key in coefficients and value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                # fp32 holds those exactly; anything else would be rounded on the way in.
                raise ValueError(f"rbd_cuda: state entry {key!r} has dtype {value.dtype}; coefficients are loaded "
                                 "into fp32 from float32, float16 or bfloat16 only")
            if key in coefficients and assign and value.dtype != torch.float32:
                raise ValueError(f"rbd_cuda: state entry {key!r} has dtype {value.dtype}; with assign=True the "
                                 "coefficients must be float32 (they would take the saved tensor's dtype)")
            if key in theta0 and value.dtype != target.dtype:
                raise ValueError(f"rbd_cuda: state entry {key!r} (θ₀) has dtype {value.dtype}, this wrapper's "
                                 f"{target.dtype}; convert the wrapper with .to(dtype) first")
            if (key in coefficients or key in theta0) and not bool(torch.isfinite(value).all()):
                raise ValueError(f"rbd_cuda: state entry {key!r} holds non-finite values")

    def weights(self) -> dict[str, torch.Tensor]:
        """θ₀ + P c for every reparametrised parameter, by name (differentiable in c and λ): one
        ``expand_grouped_`` over every segment forward, one ``project_grouped`` backward."""
        coeffs = []
        for k, comp in enumerate(self.compartments):
            c_k = self.c[comp.offset: comp.offset + comp.dim] * self._sqrt_scale[k]
            # Scaling the d coefficients, not the numel-long result: P (λ c) = λ P c.
            coeffs += [c_k * self.lambdas[self._layer_index[name]] if self.said else c_k
                       for name, _, _, _ in comp.segments]
        # The table's compartment s is segment s with its own coefficients (its basis: its
        # compartment's), so that SAID scales each segment's.
        updates = expand_segments(self._table, torch.cat(coeffs), Basis(self.seed, 0, 0, self.distribution))
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {name: [] for name in self._names}
        for (name, start), u in zip(self._segment_names, updates, strict=True):
            pieces[name].append((start, u))
        out = {}
        for name in self._names:
            theta0 = self.get_buffer(f"module.{name}")
            parts = [u for _, u in sorted(pieces[name], key=lambda item: item[0])]
            delta = parts[0] if len(parts) == 1 else torch.cat(parts)
            out[name] = theta0 + delta.to(theta0.dtype).view(self._shapes[name])
        return out

    def _forward(self, *args, **kwargs):
        # Only the canonical name of a tied parameter is passed: functional_call ties the aliases.
        return functional_call(self.module, self.weights(), args, kwargs)

    forward = _SignedForward()

    def _apply(self, fn, recurse=True):
        keep = [t for t in (self.c, self.lambdas) if t is not None]
        keep += [t.grad for t in keep if t.grad is not None]

        def apply(t):
            out = fn(t)
            # c and λ stay fp32 through .half(), .to(dtype) and precision plugins (they follow device
            # moves): one step's change of c is often below fp16's resolution at c's magnitude.
            if out.dtype != t.dtype and any(t is k for k in keep):
                return t.to(device=out.device)
            return out

        super()._apply(apply, recurse)
        # A conversion replaces each submodule's buffers one by one.
        self._retie()
        return self

    def _retie(self) -> None:
        """Puts θ₀ of each tied parameter back under all its names as one tensor: separate copies
        would leave all but one name at θ₀ in the forward (functional_call ties by identity)."""
        for name in self._names:
            theta0 = self.module.get_buffer(name)
            for alias in self._aliases[name]:
                owner, attr = split_name(alias)
                self.module.get_submodule(owner)._buffers[attr] = theta0

    @torch.no_grad()
    def export(self) -> nn.Module:
        """A plain copy of the module whose parameters are the current θ₀ + P c (tied weights stay
        tied); the wrapper is left unchanged. Its ``save_pretrained``/``generate`` (transformers)
        work: those of ``self.module`` refuse, as it holds θ₀."""
        plain = copy.deepcopy(self.module)
        for method in NEEDS_EXPORT:
            plain.__dict__.pop(method, None)
        for name, value in self.weights().items():
            param = nn.Parameter(value.detach().clone())
            for alias in self._aliases[name]:
                owner, attr = split_name(alias)
                owner = plain.get_submodule(owner)
                delattr(owner, attr)
                owner.register_parameter(attr, param)
        return plain

    def summary(self) -> dict:
        """Compartments (name, stream, entries, directions), D, d and the trainable count."""
        rows = [{"name": comp.name, "stream": comp.stream, "numel": comp.numel, "dim": comp.dim}
                for comp in self.compartments]
        trainable = self.dim + (len(self._layers) if self.said else 0)
        return {"compartments": rows, "numel": self.numel, "dim": self.dim, "trainable": trainable,
                "compression": self.numel / self.dim}

    def subspace_parameters(self) -> Iterator[nn.Parameter]:
        """c, then λ when ``said``: the same as ``parameters()`` unless the module has frozen ones."""
        yield self.c
        if self.lambdas is not None:
            yield self.lambdas

    def extra_repr(self) -> str:
        return (f"numel={self.numel}, dim={self.dim}, seed={self.seed}, distribution={self.distribution!r}, "
                f"compartments={len(self.compartments)}, normalize={self.normalize!r}, said={self.said}")


def _retie_after_load(wrapper: RandomSubspace, _incompatible_keys) -> None:
    wrapper._retie()


class _NeedsExport:
    """Stands in for a method of the wrapped module that needs the trained weights (``NEEDS_EXPORT``)."""

    def __init__(self, method: str):
        self.method = method

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"rbd_cuda: the module inside a RandomSubspace holds θ₀ as buffers, not the trained "
                           f"weights θ₀ + P c; call wrapper.export().{self.method}(...), on a plain copy with "
                           "the trained weights")


def _read_config(value, key: str) -> dict:
    """The saved configuration, without its format: from JSON in a uint8 tensor (format 2)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.uint8 or value.dim() != 1:
            raise ValueError(f"rbd_cuda: state entry {key!r} must be the RandomSubspace configuration as a 1-D "
                             f"uint8 tensor, got {value.dtype} of shape {tuple(value.shape)}")
        try:
            config = json.loads(bytes(value.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"rbd_cuda: state entry {key!r} is not a RandomSubspace configuration (not JSON)") from None
        if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
            raise ValueError(f"rbd_cuda: state entry {key!r} is not a format-{CONFIG_FORMAT} RandomSubspace "
                             f"configuration")
    elif isinstance(value, dict) and value.get("format") == 1:
        raise ValueError(f"rbd_cuda: state entry {key!r} is a RandomSubspace configuration of format 1 (written "
                         "by fcd40d6 or before), which this version no longer reads (docs/formats.md)")
    else:
        raise ValueError(f"rbd_cuda: state entry {key!r} must be a RandomSubspace configuration (a uint8 tensor "
                         f"of format {CONFIG_FORMAT}), got {type(value).__name__}")
    return {k: v for k, v in config.items() if k != "format"}
