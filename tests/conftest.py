import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class HookRegistrations:
    """Counts PyTorch hook registrations on any module while active (to prove idle runs register none)."""

    METHODS = ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
               "register_full_backward_pre_hook", "register_backward_hook")

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        for method in self.METHODS:
            original = getattr(torch.nn.Module, method)

            def counting(module, *args, _original=original, _method=method, **kwargs):
                self.calls.append((_method, type(module).__name__))
                return _original(module, *args, **kwargs)

            monkeypatch.setattr(torch.nn.Module, method, counting)


@pytest.fixture
def hook_registrations(monkeypatch):
    return HookRegistrations(monkeypatch)


def module_hook_counts(module: torch.nn.Module) -> dict[str, int]:
    """How many PyTorch hooks each submodule holds (to prove none are left behind)."""
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for name, m in module.named_modules()
    }


@pytest.fixture
def hook_counts():
    return module_hook_counts
