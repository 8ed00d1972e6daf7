"""Start-up hook that makes `lm_eval --model slmkit ...` resolve, with lm-eval releases that find no plugins.

Why it exists. lm-eval's command line and `simple_evaluate` look a model name up with
`lm_eval.api.registry.get_model(NAME)`. Up to 0.4.13 (the newest release when this was written) that function
only reads lm-eval's in-process registry, filled by lm-eval's own `lm_eval.models` package and by
`@register_model` in modules that happen to be imported; nothing reads the `lm_eval.models` entry points of
installed packages, and the `lm_eval` console script never imports third-party code. So `--model slmkit` can
only work if something inside the `lm_eval` process imports slmkit's adapter first. A `.pth` file is the one
place where an installed package gets code run in every interpreter: `slmkit_lm_eval_hook.pth`, installed next
to this module in site-packages (see setup.py), holds the single line `import _slmkit_lm_eval_hook`.

Every Python process of the environment runs that line, so this module is deliberately tiny: a top-level
module (importing it does not import the slmkit package, torch or lm-eval), using only `sys`, which is
already loaded. It puts one finder at the front of `sys.meta_path` that ignores every import except
`lm_eval.api.registry`. When that module is imported, the finder lets the regular machinery find and run it,
then replaces its `get_model` with a wrapper: for the name `slmkit` (while not registered yet) the wrapper
imports `lm_eval.models` (lm-eval's own models; 0.4.13 adds them only when the registry is still empty, so
registering ours first would hide them) and `slmkit.eval.lm_eval_adapter` (which registers `SlmkitLM`), then
defers to the original; every other name goes straight to the original. lm-eval's evaluator calls
`lm_eval.api.registry.get_model` through the module attribute, and the wrapper is in place before any other
module can import the name. Processes that never import lm-eval pay one string comparison per import; where
lm-eval is not installed, or has no `get_model` there, nothing changes. An lm-eval that does discover the
`lm_eval.models` entry point that slmkit also declares still works: the adapter keeps a name already present.

Tested in tests/test_lm_eval.py (the real `lm_eval` console script with `--model slmkit`, and that interpreter
start-up imports neither slmkit nor torch).
"""

import sys

_REGISTRY = "lm_eval.api.registry"
_MODEL = "slmkit"


def _patch(registry) -> None:
    original = getattr(registry, "get_model", None)
    if not callable(original) or getattr(original, "_slmkit_hook", False):
        return
    import functools

    @functools.wraps(original)
    def get_model(model_name, *args, **kwargs):
        if model_name == _MODEL and _MODEL not in getattr(registry, "MODEL_REGISTRY", ()):
            import lm_eval.models  # noqa: F401  lm-eval's own models first
            import slmkit.eval.lm_eval_adapter  # noqa: F401  registers SlmkitLM as "slmkit"
        return original(model_name, *args, **kwargs)

    get_model._slmkit_hook = True
    registry.get_model = get_model


class _Loader:
    """The loader that found lm_eval.api.registry, patching the module after running it."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_filename, resource readers...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _patch(module)
        except Exception:  # never break lm-eval because of this hook
            pass


class _Finder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _REGISTRY:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is cls or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)
    registry = sys.modules.get(_REGISTRY)
    if registry is not None:  # imported before the hook (not at start-up; when this module is imported later)
        _patch(registry)


install()
