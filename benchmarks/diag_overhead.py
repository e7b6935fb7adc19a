import sys, time, statistics, torch
sys.path.insert(0, "benchmarks")
from harness import time_variants, markdown
from hooked_vlm import HookedVLM
from hooked_vlm.testing import build
raw = build("openai/clip-vit-large-patch14", device="cuda", dtype=torch.bfloat16)
model = HookedVLM.from_hf(raw)
for batch in (64, 256):
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        prepared = model.prepare_inputs(x)
        t = []
        for _ in range(200):
            s = time.perf_counter(); model.prepare_inputs(x); t.append(time.perf_counter() - s)
        print(f"b{batch} prepare_inputs: {statistics.median(t)*1e6:.1f} us")
        rows = time_variants({
            "raw": lambda: raw.get_image_features(pixel_values=x),
            "raw_again": lambda: raw.get_image_features(pixel_values=x),
            "hooked": lambda: model(x),
            "hooked_prepared": lambda: model(prepared),
            "adapter_forward": lambda: model.adapter.forward(prepared),
        }, {"raw_again": "raw", "hooked": "raw", "hooked_prepared": "raw", "adapter_forward": "raw"}, rounds=40)
        print(markdown(f"b{batch}", rows))
