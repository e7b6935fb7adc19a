"""The numbers in doc/phase0/phase0_design*.md and doc/environment_guide*.md, computed from the code.

Every table between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->`` in those pages is
rendered here from the shipped real-size checkpoint configs (built on the meta device: shapes only, no weights)
and from pyproject.toml, so the pages cannot drift from the code:

    python doc/phase0/facts.py           # check: exit 1 and name the table that differs
    python doc/phase0/facts.py --write   # rewrite the tables in place

tests/test_phase0_docs.py runs the check.
"""

from __future__ import annotations

import re
import sys
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "doc/phase0/phase0_design.md", ROOT / "doc/phase0/phase0_design.ja.md",
         ROOT / "doc/environment_guide.md", ROOT / "doc/environment_guide.ja.md"]
CHECKPOINTS = [
    "openai/clip-vit-large-patch14",
    "openai/clip-vit-large-patch14-336",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "llava-hf/llava-onevision-qwen2-72b-ov-hf",
    "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen/Qwen2-VL-7B-Instruct",
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
]
TOKENS = 4096  # the sequence length the memory table budgets for
GIB = 2**30


def _leaves(module) -> str:
    """A projector as its layers in order: ``LayerNorm(1280) → Linear(5120→5120) → GELU → Linear(5120→1536)``."""
    from torch import nn

    parts = []
    for child in module.modules():
        if list(child.children()):
            continue
        if isinstance(child, nn.Linear):
            parts.append(f"Linear({child.in_features}→{child.out_features})")
        elif hasattr(child, "normalized_shape") or type(child).__name__.endswith("RMSNorm"):
            shape = getattr(child, "normalized_shape", None) or (child.weight.shape[0],)
            parts.append(f"{'RMSNorm' if 'RMS' in type(child).__name__ else 'LayerNorm'}({shape[0]})")
        else:
            parts.append(type(child).__name__.removesuffix("Activation"))
    return " → ".join(parts)


@cache
def facts(name: str) -> dict:
    from hooked_vlm import HookedVLM
    from hooked_vlm.testing import load_config, meta_model

    raw = meta_model(name)
    model = HookedVLM.from_hf(raw)
    config = load_config(name)
    towers = {tower.name: tower for tower in model.adapter.towers()}
    vision = towers["vision"]
    vc = config.get("vision_config", {})
    patch = vc["patch_size"]
    family = model.adapter.family
    params = sum(p.numel() for p in raw.parameters())
    out = {"family": family, "params": params, "vision": vision, "hooks": len(model.hook_names()),
           "lm": towers.get("lm"), "text": towers.get("text")}
    if family == "clip":
        side = vc["image_size"] // patch
        out["projector"] = f"visual_projection: {_leaves(raw.visual_projection)}, no bias"
        out["flow"] = (f"{vc['image_size']}² px → {side}×{side} patches of {patch} px + CLS = {side * side + 1} positions "
                       f"→ `vision.hook_out` (normed CLS) → `hook_image_embeds` [{config.get('projection_dim', 768)}]")
        out["vision_shape"] = f"[batch, {side * side + 1}, {vision.d_model}]"
    elif family == "llava_onevision":
        side = vc["image_size"] // patch
        lm = towers["lm"]
        out["projector"] = f"multi_modal_projector: {_leaves(raw.model.multi_modal_projector)}"
        out["flow"] = (f"anyres tiles of {vc['image_size']}² px (base + grid, {config['vision_aspect_ratio']}) → "
                       f"{side}×{side} = {side * side} SigLIP tokens per tile, no CLS → `projector.hook_out` per tile → "
                       f"`projector.hook_packed` (unpadded grid + 1 `image_newline` per row) → `lm.hook_embed` "
                       f"[.., {lm.d_model}]")
        out["vision_shape"] = f"[tiles, {side * side}, {vision.d_model}]"
    else:  # qwen2_vl and qwen2_5_vl
        merge = vc["spatial_merge_size"]
        lm = towers["lm"]
        out["projector"] = f"visual.merger: {_leaves(raw.model.visual.merger)}"
        out["flow"] = (f"image resized to sides multiple of {patch * merge} px → {patch}-px patches, packed in "
                       f"{merge}×{merge} merge-window order → ViT with 2-D RoPE → `projector.hook_merged` ({merge * merge} "
                       f"patches → 1) → `projector.hook_out` → `lm.hook_embed` [.., {lm.d_model}], "
                       f"(H/{patch * merge})·(W/{patch * merge}) tokens per image")
        out["vision_shape"] = f"[1, Σ patches, {vision.d_model}] (all images packed)"
    return out


def _tower(tower) -> str:
    heads = f"{tower.n_heads} heads" + (f" ({tower.n_kv_heads} KV)" if tower.n_kv_heads else "")
    return f"{tower.n_layers} × d {tower.d_model}, {heads} of {tower.d_head}, MLP {tower.d_mlp}"


def structure(lang: str) -> str:
    head = {"en": "| checkpoint | vision tower | projector | LM / text tower | hook names | parameters |",
            "ja": "| チェックポイント | ビジョンタワー | プロジェクタ | LM / テキストタワー | フック名の数 | パラメータ数 |"}[lang]
    rows = [head, "|---|---|---|---|---|---|"]
    for name in CHECKPOINTS:
        f = facts(name)
        other = f["lm"] or f["text"]
        rows.append(f"| `{name}` | {_tower(f['vision'])} | {f['projector']} | {other.name}: {_tower(other)} | "
                    f"{f['hooks']} | {f['params'] / 1e9:.3f} B |")
    return "\n".join(rows)


def flow(lang: str) -> str:
    head = {"en": "| family | image → embedding → LM tokens | vision `hook_resid_post` |",
            "ja": "| ファミリー | 画像 → 埋め込み → LM トークン | ビジョンの `hook_resid_post` |"}[lang]
    rows, seen = [head, "|---|---|---|"], set()
    for name in CHECKPOINTS:
        f = facts(name)
        key = (f["family"], f["flow"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(f"| {f['family']} (`{name}`) | {f['flow']} | {f['vision_shape']} |")
    return "\n".join(rows)


def memory(lang: str) -> str:
    head = {"en": f"| checkpoint | bf16 weights | + KV cache, {TOKENS:,} tokens | + every block's `hook_resid_post` "
                  f"cached, {TOKENS:,} positions | total |",
            "ja": f"| チェックポイント | bf16 の重み | + KV キャッシュ（{TOKENS:,} トークン） | + 全ブロックの "
                  f"`hook_resid_post` をキャッシュ（{TOKENS:,} 位置） | 合計 |"}[lang]
    rows = [head, "|---|---|---|---|---|"]
    for name in CHECKPOINTS:
        f = facts(name)
        weights = f["params"] * 2
        lm = f["lm"]
        if lm is not None:  # K and V of every LM layer, bf16
            kv = 2 * lm.n_layers * lm.n_kv_heads * lm.d_head * 2 * TOKENS
            resid = lm.n_layers * lm.d_model * 2 * TOKENS
        else:  # CLIP encodes with no KV cache; its positions are image positions
            kv = 0
            resid = f["vision"].n_layers * f["vision"].d_model * 2 * TOKENS
        cell = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        rows.append(f"| `{name}` | {cell(weights)} | {cell(kv) if kv else '—'} | {cell(resid)} | "
                    f"{cell(weights + kv + resid)} |")
    return "\n".join(rows)


def versions(lang: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["test"]
    head = {"en": "| package | tested (the floor in pyproject.toml) |",
            "ja": "| パッケージ | テスト済み（pyproject.toml の下限） |"}[lang]
    rows = [head, "|---|---|", f"| Python | {project['requires-python']} |"]
    seen = set()
    for dep in deps:
        dep = dep.split(";")[0].strip()
        match = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", dep)
        name, spec = match.group(1), match.group(2)
        if name in seen or not spec:
            continue
        seen.add(name)
        rows.append(f"| {name} | {spec.replace(',', ', ')} |")
    return "\n".join(rows)


TABLES = {"structure": structure, "flow": flow, "memory": memory, "versions": versions}
BLOCK = re.compile(r"(<!-- BEGIN generated:(\w+) -->)(.*?)(<!-- END generated:\2 -->)", re.S)


def render(page: Path) -> str:
    lang = "ja" if page.name.endswith(".ja.md") else "en"
    text = page.read_text()
    blocks = BLOCK.findall(text)
    if not blocks:
        raise ValueError(f"{page} has no <!-- BEGIN generated:NAME --> block")
    unknown = sorted({name for _, name, _, _ in blocks} - set(TABLES))
    if unknown:
        raise ValueError(f"{page}: unknown generated tables {unknown}; known: {sorted(TABLES)}")
    return BLOCK.sub(lambda m: f"{m.group(1)}\n{TABLES[m.group(2)](lang)}\n{m.group(4)}", text)


def main(argv: list[str]) -> int:
    stale = []
    for page in PAGES:
        new = render(page)
        if "--write" in argv:
            page.write_text(new)
        elif new != page.read_text():
            blocks = [m.group(2) for m, n in zip(BLOCK.finditer(page.read_text()), BLOCK.finditer(new), strict=True)
                      if m.group(3) != n.group(3)]
            stale.append(f"{page.relative_to(ROOT)}: {', '.join(blocks)}")
    if stale:
        print("generated tables out of date (run python doc/phase0/facts.py --write):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
