"""The suite's bf16 leg in every process a test starts (see tests/conftest.py, FINETUNE_TEST_CPU_BF16):
Python imports this module at start-up when this folder is on PYTHONPATH, and it makes finetune's
`train.mixed_precision=auto` resolve as on a CPU with native bf16 (AVX512-BF16 / AMX) by replacing
finetune.cli.cpu_has_fast_bf16 once that module is loaded. bf16 autocast runs on any CPU (emulated,
slowly, on AVX2), which tiny models can afford. Nothing in the product knows about it."""

import importlib.abc
import importlib.util
import sys

TARGET = "finetune.cli"


def forced(native):
    """cpu_has_fast_bf16 answering True; ``.native`` keeps what this CPU really has."""

    def cpu_has_fast_bf16() -> bool:
        return True

    cpu_has_fast_bf16.native = native
    return cpu_has_fast_bf16


class _ForceCpuBf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # let the real finders find the module
        spec = importlib.util.find_spec(name)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            module.cpu_has_fast_bf16 = forced(module.cpu_has_fast_bf16)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _ForceCpuBf16())


def _chain_next_sitecustomize() -> None:
    """Python imports only the first sitecustomize on the path: run the next one too (the network
    guard of tests/hub_server.py puts one on PYTHONPATH after this folder)."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(candidate):
            with open(candidate) as f:
                exec(compile(f.read(), candidate, "exec"), {"__name__": "sitecustomize", "__file__": candidate})
            return


_chain_next_sitecustomize()
