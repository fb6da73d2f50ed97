"""What epa_ext's autograd formulas share: higher-order gradients and the transforms they refuse.

Second and higher derivatives. An op's backward runs its kernel; under
``create_graph=True`` (grad mode is on inside the backward) that kernel's result would be a
constant to autograd, and a second derivative would silently miss every term that goes through
it. Two sound ways out, used by the ops:

- register an autograd formula on the backward op itself (token_logps_backward does: its double
  backward is written with differentiable torch ops), so the first derivative still comes from the
  kernel and only an actual second differentiation pays for the formula;
- or, for ops whose inputs are small, compute the gradient under ``create_graph=True`` from the
  op's plain-torch definition (``gradients_by_definition``), which autograd can differentiate
  to any order.

torch.func. ``torch.library.register_autograd`` builds an autograd.Function without the
``setup_context`` staticmethod that functorch's grad transforms need, and gives the ops no
forward-mode formula, so torch.func.grad / vjp / jacrev / hessian would fail inside PyTorch and
torch.func.jvp / jacfwd and ``torch.autograd.forward_ad`` would return a zero tangent without a
word. ``check_autograd_support`` refuses both with an error that says what to use instead.
torch.func.vmap on its own (no differentiating transform) is supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

_DIFFERENTIATING_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _differentiating_transform_active() -> bool:
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(interpreter.key() in _DIFFERENTIATING_TRANSFORMS for interpreter in stack)


def _has_forward_tangent(tensors: Sequence[Tensor | None]) -> bool:
    if forward_ad._current_level < 0:  # no dual level entered: the common case, checked first
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def check_autograd_support(function: str, *tensors: Tensor | None) -> None:
    """Raise NotImplementedError if ``function`` is called under a torch.func transform that
    differentiates (grad, vjp, jacrev, jacfwd, jvp, hessian) or with forward-mode dual tensors.

    Free of cost under torch.compile (dynamo sees no transform) and cheap in eager mode.
    """
    if torch.compiler.is_compiling():
        return
    if _differentiating_transform_active():
        what = "torch.func's differentiating transforms (grad, vjp, jacrev, jacfwd, jvp, hessian)"
    elif _has_forward_tangent(tensors):
        what = "forward-mode AD (torch.autograd.forward_ad dual tensors)"
    else:
        return
    raise NotImplementedError(
        f"epa_ext.{function} does not support {what}: its autograd is registered through torch.library, "
        "which gives these ops reverse-mode autograd only. Use torch.autograd.grad (with create_graph=True "
        "for second derivatives and Hessian-vector products), or apply torch.func to the plain-torch "
        "definitions in epa_ext.eager. torch.func.vmap alone is supported."
    )


def gradients_by_definition(definition: Callable[..., Tensor], inputs: Sequence[Tensor | None],
                            needs_input_grad: Sequence[bool], grad_output: Tensor) -> list[Tensor | None]:
    """Gradients of ``definition(*inputs)`` (contracted with ``grad_output``) with respect to the
    inputs that need them, as a graph that autograd can differentiate again.

    For a backward formula under ``create_graph=True``: ``definition`` is the op's plain-torch
    definition (epa_ext.eager), ``inputs`` the tensors the op was called with (saved for
    backward), ``needs_input_grad`` the ctx's flags. Each argument is evaluated through its own
    alias, so a tensor passed twice (``dpo_loss(x, x, ...)``) gets each argument's partial
    derivative once, as autograd then sums them. Returns one entry per input (None where not
    needed).
    """
    with torch.enable_grad():  # also for the aliases: a view made without grad mode is not differentiable
        aliases = [t.view_as(t) if t is not None and need else t for t, need in zip(inputs, needs_input_grad)]
        wanted = [i for i, t in enumerate(aliases) if t is not None and needs_input_grad[i]]
        output = definition(*aliases)
        grads = torch.autograd.grad(output, [aliases[i] for i in wanted], grad_output, create_graph=True,
                                    allow_unused=True, materialize_grads=True)
    result: list[Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return result
