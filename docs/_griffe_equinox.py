"""A griffe extension: gives Equinox modules without an `__init__` of their own the
signature of the `__init__` that `eqx.Module` generates from their fields.

Static analysis sees `class Reversible(eqx.Module): beta: float = 0.5` as a class with
attributes and no constructor, so the API pages would show no signature. This reads the
generated constructor's signature at run time (`inspect.signature`) and the annotations
from the source.
"""

import importlib
import inspect

import griffe


class EquinoxModuleInit(griffe.Extension):
    def on_class_members(self, *, node, cls, agent, **kwargs) -> None:
        del node, agent, kwargs
        if "__init__" in cls.members or cls.name.startswith("Abstract"):
            return
        try:
            import equinox as eqx

            runtime = getattr(importlib.import_module(cls.module.path), cls.name)
        except Exception:
            return
        if not (isinstance(runtime, type) and issubclass(runtime, eqx.Module)):
            return
        if "__init__" in vars(runtime):
            # A hand-written `__init__` that static analysis missed: leave it alone.
            if not getattr(runtime.__init__, "__qualname__", "").endswith("__init__"):
                return
        try:
            sig = inspect.signature(runtime)
        except (TypeError, ValueError):
            return
        params = griffe.Parameters(
            griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)
        )
        for p in sig.parameters.values():
            member = cls.members.get(p.name)
            if "repr=False" in str(getattr(member, "value", "")):
                continue  # internal fields filled in by the library (e.g. `ExactState.ratio`)
            annotation = getattr(member, "annotation", None)
            default = None
            if p.default is not inspect.Parameter.empty:
                source = getattr(member, "value", None)
                if source is not None and not str(source).startswith(("eqx.field", "field(")):
                    default = source
                else:
                    default = repr(p.default)
            params.add(
                griffe.Parameter(
                    p.name,
                    annotation=annotation,
                    kind=griffe.ParameterKind[p.kind.name.lower()],
                    default=default,
                )
            )
        init = griffe.Function("__init__", parameters=params, returns=None)
        cls.set_member("__init__", init)
