"""Who is calling the optimizers, where nothing they are passed says so: a
``ZeroRedundancyOptimizer`` building one (refused), and ``torch.distributed.checkpoint``'s
state-dict helpers stepping one to create its state (ignored).

Why the call stack: ZeRO builds ``optimizer_class(partition, **defaults)`` from its private
``_init_local_optimizer``, passing nothing that tells a partition from a model's parameters; the
checkpoint helpers' ``_init_optim_state`` calls ``optim.step()`` after setting zero gradients and
lr 0, which a user's own step (a warm-up from lr 0) can look like too. torch offers no hook,
flag or context for either (neither is public API), so the only reliable signal is the private
function on the stack, looked up by identity (its code object), never by name matching, and only
when its module is already loaded. tests/test_sharded.py and tests/test_frameworks.py exercise
both against the pinned torch (requirements-dev.txt), and tests/test_optim.py checks that the
two private functions still exist there: a torch that renames them fails that test instead of
silently stepping.
"""

from __future__ import annotations

import sys

# (module, attribute path) of the private functions looked for: the test checks these exist.
ZERO_BUILDER = ("torch.distributed.optim.zero_redundancy_optimizer", "ZeroRedundancyOptimizer._init_local_optimizer")
CHECKPOINT_STEPPER = ("torch.distributed.checkpoint.state_dict", "_init_optim_state")


def _loaded(where: tuple[str, str]):
    """The function at ``where`` if its module is loaded (None otherwise: it cannot be running)."""
    module, path = where
    found = sys.modules.get(module)
    for name in path.split("."):
        found = getattr(found, name, None)
    return found


def _on_stack(function) -> bool:
    """Whether ``function`` (None: not loaded) is running below the caller of this module's check."""
    code = getattr(function, "__code__", None)
    frame = sys._getframe(2) if code is not None else None
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


def built_by_zero() -> bool:
    """Whether a ``ZeroRedundancyOptimizer`` is building this optimizer: its
    ``_init_local_optimizer`` is on the call stack (nothing it passes says so)."""
    return _on_stack(_loaded(ZERO_BUILDER))


def stepped_by_checkpoint() -> bool:
    """Whether ``torch.distributed.checkpoint``'s state-dict helpers are calling ``step``: to create
    the state of an optimizer that has none, ``get_optimizer_state_dict`` and
    ``set_optimizer_state_dict`` step it once with zero gradients at lr 0 (``_init_optim_state``).
    That step would change no parameter but would count, moving every later basis: saving a
    checkpoint would change the run. The optimizers' ``step`` returns at once instead."""
    return _on_stack(_loaded(CHECKPOINT_STEPPER))
