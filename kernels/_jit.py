"""Lazy ``triton.jit`` that honours ``TRITON_INTERPRET`` at *launch* time.

In triton 3.9 ``@triton.jit`` decides at decoration time (i.e. when the module
defining the kernel is imported) whether to build a compiled ``JITFunction`` or
an interpreter ``InterpretedFunction``: it reads ``triton.knobs.runtime.interpret``,
which reads the ``TRITON_INTERPRET`` environment variable each time it is
accessed.  Importing ``triton`` itself caches nothing.  To make the choice
independent of import order (e.g. a test that sets ``TRITON_INTERPRET=1`` after
another test imported this package), kernels here are wrapped in ``lazy_jit``,
which looks at the knob on every launch and builds (once each) the variant asked for.
"""
from __future__ import annotations


class lazy_jit:
    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self._compiled = None
        self._interpreted = None

    def kernel(self):
        import triton

        if triton.knobs.runtime.interpret:
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled

    def __getitem__(self, grid):
        return self.kernel()[grid]


def interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)
