"""DPO losses written as people write them, correct and deliberately broken, for minidpo.verify.

Each module (numpy_losses, torch_losses, jax_losses) lists
    CORRECT: Case(fn, variant, ...) that `minidpo verify` must pass, and
    BROKEN:  Case(fn, variant, expect=property name) that it must reject, naming that property.
official_dpo.py is the official repository's preference_loss, written out in PyTorch.
Calling convention: fn(pi_w, pi_l, ref_w, ref_l, beta, **hyper-parameters), all (N,).
"""

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Case:
    fn: Callable
    variant: str = "dpo"
    expect: str | None = None  # the property a broken loss must fail
    check: dict = field(default_factory=dict)  # extra keyword arguments for check_loss
    bug: str = ""  # one line: what is wrong

    @property
    def id(self) -> str:
        return self.fn.__name__
