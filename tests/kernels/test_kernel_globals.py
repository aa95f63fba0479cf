"""Every global a @triton.jit function reads must be something the Triton *compiler* accepts.

The interpreter (which CI runs) happily reads plain Python floats from module globals; the GPU
compiler rejects them ("Cannot access global variable ... from within @jit'ed function"). This
static check catches that on CPU: each global name a kernel body uses must be a module (tl,
triton, ...), another jit function, a builtin, or a tl.constexpr.
"""

import builtins
import importlib
import pkgutil
import types

import pytest
import triton
import triton.language as tl

import fastkern.kernels


def _is_kernel(obj) -> bool:
    # JITFunction when compiled; InterpretedFunction under TRITON_INTERPRET=1.
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") and hasattr(obj, "fn")


def jit_functions():
    for info in pkgutil.iter_modules(fastkern.kernels.__path__):
        module = importlib.import_module(f"fastkern.kernels.{info.name}")
        for name, obj in vars(module).items():
            if _is_kernel(obj) and obj.fn.__module__ == module.__name__:
                yield pytest.param(module, obj, id=f"{info.name}.{name}")


def _acceptable(value) -> bool:
    return (
        isinstance(value, (types.ModuleType, tl.constexpr, tl.dtype))
        or _is_kernel(value)
        or callable(value) and getattr(value, "__module__", "").startswith("triton")
    )


@pytest.mark.parametrize("module,fn", list(jit_functions()))
def test_kernel_globals_are_compiler_safe(module, fn):
    code = fn.fn.__code__
    names = set(code.co_names)
    for const in code.co_consts:  # nested code objects (comprehensions are not allowed in kernels anyway)
        if isinstance(const, types.CodeType):
            names |= set(const.co_names)
    bad = []
    for name in names:
        if name in vars(module):
            if not _acceptable(vars(module)[name]):
                bad.append(f"{name} = {vars(module)[name]!r}")
        elif not hasattr(builtins, name):
            pass  # attribute names (tl.load -> 'load') also land in co_names
    assert not bad, f"{fn.fn.__qualname__} reads non-constexpr globals: {bad}; write them as literals in the kernel"


def test_the_check_catches_a_plain_float_global():
    from tests.kernels import bad_kernel_sample

    with pytest.raises(AssertionError, match="SCALE"):
        test_kernel_globals_are_compiler_safe(bad_kernel_sample, bad_kernel_sample.scaled_kernel)
