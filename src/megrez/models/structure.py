"""A process-wide count of changes to how modules are assembled: a parameter, buffer or submodule
assigned anywhere (torch's global registration hooks) or a quantized weight replaced
(``megrez.quant.modules`` calls :func:`changed`). What describes a model once for the kernels
(``Model``'s whole-step decode plan) compares the count instead of looking every module and
weight up again each step: at one token those ~500 lookups, whose objects the step's weight
reads have pushed out of the CPU caches, cost 0.2-0.3 ms of a 3.5 ms step.

Not counted: writes into a module's ``_parameters``/``_modules``/``__dict__`` that go around
``setattr`` (torch's own assignments all go through it), and a tensor's ``.data`` reassigned;
in-place writes need no count (the kernels read the tensors where they lie)."""
from __future__ import annotations

import torch.nn.modules.module as _module

_count = 0


def count() -> int:
    return _count


def changed(*_) -> None:
    """Record a change (returns None: as a registration hook it replaces nothing)."""
    global _count
    _count += 1


_module.register_module_parameter_registration_hook(changed)
_module.register_module_buffer_registration_hook(changed)
_module.register_module_module_registration_hook(changed)
