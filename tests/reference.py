"""Independent references shared by the tests: PyTorch hooks placed straight on the wrapped model's modules."""


def direct_hooks(module, spec):
    """PyTorch hooks placed straight on HF modules (``"in"``: first input, ``"out"``: output)."""
    store, handles = {}, []
    for key, (path, boundary) in spec.items():
        sub = module.get_submodule(path)
        if boundary == "in":
            handles.append(sub.register_forward_pre_hook(lambda m, a, key=key: store.__setitem__(key, a[0].detach())))
        else:
            handles.append(
                sub.register_forward_hook(
                    lambda m, a, o, key=key: store.__setitem__(key, (o[0] if isinstance(o, tuple) else o).detach())
                )
            )
    return store, handles
