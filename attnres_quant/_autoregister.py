"""Register the reference model with transformers' Auto classes on ``import attnres_quant``.

``import fla`` registers FLA's models by importing them, which costs torch and transformers' modeling
stack on every import. We keep ``import attnres_quant`` (and so ``python -m attnres_quant --help``)
light instead: if transformers' auto classes are already loaded we register at once; otherwise a
meta-path finder watches transformers' own imports and registers as soon as the outermost
transformers import that loaded ``transformers.models.auto`` (``from transformers import
AutoModelForCausalLM``, ``AutoConfig``, ``AutoTokenizer``, ...) has finished. Registration then
imports ``attnres_quant.model``, whose import registers ``attnres`` (and FLA's ``transformer``
type) with ``AutoConfig`` and ``AutoModelForCausalLM``, and the finder removes itself.

Waiting for the *outermost* transformers import to finish means registration never runs while a
transformers module is half-initialised (our modeling code imports ``PreTrainedModel`` and friends).
The wrapped loaders are only on ``transformers`` modules and are swapped back for the originals
(``__loader__``, ``__spec__.loader``) as soon as each module has executed.
"""

from __future__ import annotations

import sys
import threading
import warnings

TRIGGERS = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")


def register_now() -> None:
    """Import the reference model; its package import registers it with the Auto classes."""
    import attnres_quant.model  # noqa: F401


def _loaded(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


class _Finder:
    """A meta-path finder that wraps the loaders of ``transformers.*`` modules until registration."""

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self.done = False

    # importlib protocol ------------------------------------------------------------------------
    def find_spec(self, fullname, path, target=None):
        if self.done or fullname.partition(".")[0] != "transformers" or getattr(self._local, "finding", False):
            return None
        self._local.finding = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._local.finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(self, spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass

    # bookkeeping ------------------------------------------------------------------------------
    def enter(self) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def leave(self, name: str) -> None:
        self._local.depth -= 1
        # ``name`` has executed but is still flagged as initialising until its import returns.
        if self._local.depth == 0 and not self.done and any(t == name or _loaded(t) for t in TRIGGERS):
            self.register()

    def register(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
        try:
            register_now()
        except Exception as exc:  # never break the user's own transformers import
            warnings.warn(f"attnres_quant could not register its `attnres` model with transformers' Auto "
                          f"classes ({type(exc).__name__}: {exc}); `import attnres_quant.model` registers it.",
                          RuntimeWarning, stacklevel=2)


class _Loader:
    """Delegates to the real loader; counts nested transformers imports; restores the real loader."""

    def __init__(self, finder: _Finder, loader):
        self._finder, self._loader = finder, loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._finder.enter()
        try:
            self._loader.exec_module(module)
        finally:
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
            self._finder.leave(module.__name__)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_source, ... of the real loader
        return getattr(self._loader, name)


_FINDER: _Finder | None = None


def install() -> None:
    """Register now if transformers' auto classes are loaded, else when they are."""
    global _FINDER
    if any(_loaded(t) for t in TRIGGERS):
        register_now()
        return
    if _FINDER is None or _FINDER.done:
        _FINDER = _Finder()
        sys.meta_path.insert(0, _FINDER)
