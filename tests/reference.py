"""Independent references shared by the tests: PyTorch hooks placed straight on the wrapped model's modules."""

import copy

import torch


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


def forward_with_direct_hooks(module, spec, **inputs):
    """``(store, output)``: one no-grad forward of ``module`` on ``inputs`` with :func:`direct_hooks` of ``spec``."""
    store, handles = direct_hooks(module, spec)
    try:
        with torch.no_grad():
            return store, module(**inputs)
    finally:
        for h in handles:
            h.remove()


def block_references(raw, tower, root, n_layers, d_head, inputs):
    """Every sublayer boundary of the CLIP-style encoder layers (CLIP, SigLIP) of ``tower``, from direct hooks, and
    HF's ``output_hidden_states`` of that tower, from one forward of the two-tower model on ``inputs``."""
    spec = {}
    for i in range(n_layers):
        layer = f"{root}encoder.layers.{i}"
        spec |= {
            f"{i}.ln1": (f"{layer}.layer_norm1", "out"),
            f"{i}.q": (f"{layer}.self_attn.q_proj", "out"),
            f"{i}.k": (f"{layer}.self_attn.k_proj", "out"),
            f"{i}.v": (f"{layer}.self_attn.v_proj", "out"),
            f"{i}.z": (f"{layer}.self_attn.out_proj", "in"),
            f"{i}.attn_out": (f"{layer}.self_attn", "out"),
            f"{i}.mid": (f"{layer}.layer_norm2", "in"),
            f"{i}.ln2": (f"{layer}.layer_norm2", "out"),
            f"{i}.pre": (f"{layer}.mlp.fc1", "out"),
            f"{i}.post": (f"{layer}.mlp.fc2", "in"),
            f"{i}.mlp_out": (f"{layer}.mlp", "out"),
        }
    store, out = forward_with_direct_hooks(raw, spec, **inputs, output_hidden_states=True)
    hidden = (out.vision_model_output if tower == "vision" else out.text_model_output).hidden_states
    return store, hidden


def expected_block_hooks(store, hidden, attentions, i, heads):
    """The reference of every canonical hook of CLIP-style block ``i``, from :func:`block_references` and HF's eager
    attentions; ``heads`` splits ``[..., head · d_head]`` into heads."""
    return {
        "hook_resid_pre": hidden[i],
        "ln1.hook_normalized": store[f"{i}.ln1"],
        "attn.hook_q": heads(store[f"{i}.q"]),
        "attn.hook_k": heads(store[f"{i}.k"]),
        "attn.hook_v": heads(store[f"{i}.v"]),
        "attn.hook_pattern": attentions[i],
        "attn.hook_z": heads(store[f"{i}.z"]),
        "hook_attn_out": store[f"{i}.attn_out"],
        "hook_resid_mid": store[f"{i}.mid"],
        "ln2.hook_normalized": store[f"{i}.ln2"],
        "mlp.hook_pre": store[f"{i}.pre"],
        "mlp.hook_post": store[f"{i}.post"],
        "hook_mlp_out": store[f"{i}.mlp_out"],
        "hook_resid_post": hidden[i + 1],
    }


def eager_copy(model):
    """A copy of a Hugging Face model on eager attention: the reference for attention patterns."""
    copied = copy.deepcopy(model)
    copied.set_attn_implementation("eager")
    return copied


def chat(processor, n_images: int, text: str) -> str:
    """A one-turn chat prompt with ``n_images`` image placeholders, as the checkpoint's chat template writes it."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
