"""Packaging that pyproject.toml cannot express: the `.pth` file of the lm-eval start-up hook.

Everything else (metadata, packages, the `_slmkit_lm_eval_hook` module) is declared in pyproject.toml. The
hook (src/_slmkit_lm_eval_hook.py, whose docstring says why it exists) needs `slmkit_lm_eval_hook.pth`, holding
`import _slmkit_lm_eval_hook`, at the top of site-packages, and setuptools has no declarative way to put a file
there (data_files go under the prefix's data scheme, not into site-packages). The `build_pth` step, added to
`build`, writes it:

* regular wheels (`pip install .`, `python -m build`): into build_lib, whose contents are the wheel's root
  (purelib), next to the top-level hook module;
* editable wheels (`pip install -e .`, PEP 660): build_lib is a scratch folder there, not part of the wheel.
  setuptools' editable_wheel points the `install` command's install_lib at the unpacked wheel it zips (where it
  puts the editable `.pth` files and data), so the step writes the file there as well. The name sorts after
  setuptools' `__editable__.*.pth`, which puts src/ on sys.path first, so the hook module is importable.

pip records the file in the installation's RECORD, so `pip uninstall slmkit` removes it.
"""

from __future__ import annotations

import os

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "slmkit_lm_eval_hook.pth"
PTH_LINE = "import _slmkit_lm_eval_hook\n"


class build_pth(Command):
    description = "write the lm-eval start-up hook's .pth file (see setup.py)"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        folders = [self.build_lib]
        if self.editable_mode:
            folders.append(self.get_finalized_command("install").install_lib)
        for folder in filter(None, folders):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, PTH_NAME), "w", encoding="utf-8") as f:
                f.write(PTH_LINE)

    def get_outputs(self) -> list[str]:
        return [os.path.join(self.build_lib, PTH_NAME)]

    def get_output_mapping(self) -> dict[str, str]:
        return {}

    def get_source_files(self) -> list[str]:
        return []


class build_with_pth(build):
    sub_commands = build.sub_commands + [("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})
