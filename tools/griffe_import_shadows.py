"""Griffe extension for `make docs`: a package attribute bound by an import wins over the submodule of that name.

`sparsemix/__init__.py` does `from .lmer import lmer`, so at run time `sparsemix.lmer` is the function. Griffe
keeps the submodule instead (it cannot store both), and `::: sparsemix.lmer` would render the module. This
extension gives the name back to what the package imports, as Python does, so that the reference pages can name
every public object through the top-level package only. It names no module: it applies to any package whose
`__init__` imports a name from the submodule of the same name, and does nothing when there is none.
"""
from __future__ import annotations

from typing import Any

import griffe


class ImportShadowsSubmodule(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self._imports: dict[str, dict[str, str]] = {}   # package path -> {name: target path} from its __init__

    def on_module_members(self, *, mod: griffe.Module, **kwargs: Any) -> None:
        # Runs when a module's own body has been read, before its submodules are loaded (which overwrite aliases).
        if mod.is_init_module:
            self._imports[mod.path] = {name: m.target_path for name, m in mod.members.items() if m.is_alias}

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        shadowed = []
        for package_path, imports in self._imports.items():
            if not (package_path == pkg.path or package_path.startswith(pkg.path + ".")):
                continue
            package = loader.modules_collection.get_member(package_path)
            for name, target in imports.items():
                member = package.members.get(name)
                if member is not None and not member.is_alias and member.is_module \
                        and target.startswith(member.path + "."):
                    shadowed.append((package, name, target))
        if not shadowed:
            return
        # Resolve the package's aliases while the submodules are still reachable by their paths; then rebind.
        loader.resolve_module_aliases(pkg, implicit=True, external=False)
        for package, name, target in shadowed:
            obj = loader.modules_collection.get_member(target)
            package.members[name] = griffe.Alias(name, obj, parent=package)

    on_package_loaded = on_package      # the hook's name before griffe 1.x renamed it
