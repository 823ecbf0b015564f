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
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .basis import Basis, check_distribution, check_normalize, check_seed, expand_compartment, scale
from .layout import check_saved, layer_of, plan, split_name

__all__ = ["RandomSubspace", "SubspaceCompartment"]


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
            ``Compression(factor, minimum)`` from ``rbd_cuda.optim``, as for ``FPD``.
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

    ``forward(*args, **kwargs)`` runs ``module`` with θ₀ + P c through
    ``torch.func.functional_call``; ``export()`` returns a plain copy of the module with those
    weights as ordinary parameters. The seed, distribution, normalisation, SAID flag and layout
    travel in ``state_dict()`` (as extra state) and ``load_state_dict`` refuses a state saved by
    a wrapper built with other values, naming them.
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
                # One tensor object under every alias: functional_call ties the aliases by identity.
                owner.register_buffer(attr, theta0)
        self.module = module

    def basis(self, k: int) -> Basis:
        """Compartment ``k``'s basis (the one ``FPD`` uses for it)."""
        return Basis(self.seed, 0, self.compartments[k].stream, self.distribution)

    def stream_kwargs(self, k: int) -> dict:
        """The ops' keywords addressing compartment ``k``'s basis."""
        return self.basis(k).kwargs

    def config(self) -> dict:
        """Everything besides c, λ and θ₀ that decides the weights, as plain values."""
        return {"format": 1, "seed": self.seed, "distribution": self.distribution, "normalize": self.normalize,
                "said": self.said,
                "compartments": [[c.stream, c.dim, c.numel, [list(seg) for seg in c.segments]] for c in self.compartments]}

    def get_extra_state(self) -> dict:
        return self.config()

    def set_extra_state(self, state: dict) -> None:
        check_saved(state, self.config(), "this RandomSubspace state was saved by a wrapper built with other "
                    "arguments, whose weights differ")

    def weights(self) -> dict[str, torch.Tensor]:
        """θ₀ + P c for every reparametrised parameter, by name (differentiable in c and λ)."""
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {name: [] for name in self._names}
        for k, comp in enumerate(self.compartments):
            c_k = self.c[comp.offset: comp.offset + comp.dim] * self._sqrt_scale[k]
            # Scaling the d coefficients, not the numel-long result: P (λ c) = λ P c.
            coeffs = [c_k * self.lambdas[self._layer_index[name]] if self.said else c_k
                      for name, _, _, _ in comp.segments]
            updates = expand_compartment(self.basis(k), coeffs, [numel for _, _, numel, _ in comp.segments],
                                         [row_offset for _, _, _, row_offset in comp.segments])
            for (name, start, _, _), u in zip(comp.segments, updates, strict=True):
                pieces[name].append((start, u))
        out = {}
        for name in self._names:
            theta0 = self.get_buffer(f"module.{name}")
            parts = [u for _, u in sorted(pieces[name], key=lambda item: item[0])]
            delta = parts[0] if len(parts) == 1 else torch.cat(parts)
            out[name] = theta0 + delta.to(theta0.dtype).view(self._shapes[name])
        return out

    def forward(self, *args, **kwargs):
        # Only the canonical name of a tied parameter is passed: functional_call ties the aliases.
        return functional_call(self.module, self.weights(), args, kwargs)

    @torch.no_grad()
    def export(self) -> nn.Module:
        """A plain copy of the module whose parameters are the current θ₀ + P c (tied weights stay
        tied); the wrapper is left unchanged."""
        plain = copy.deepcopy(self.module)
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
