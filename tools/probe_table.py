"""Summarise testbed recipe probes: per `carsam testbed build --out ROOT/<name>` folder (with `carsam stats ...
--out ROOT/<name>/stats`), the recipe, the card's training IoU and FP metrics, the token embeddings' rms and the
first token->image attention's token and image input ranges, as a Markdown table (docs/testbed.md).

    python tools/probe_table.py build/probes
"""

import json
import sys
from pathlib import Path

import pandas as pd
import torch

root = Path(sys.argv[1] if len(sys.argv) > 1 else "build/probes")
rows = []
for card_path in sorted(root.glob("*/testbed.json")):
    name = card_path.parent.name
    card = json.loads(card_path.read_text())
    sd = torch.load(card_path.parent / "testbed_sam.pth", weights_only=True)
    tok = torch.cat([sd[k].float()[:1] for k in ("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight",
                                                  "prompt_encoder.point_embeddings.2.weight",
                                                  "prompt_encoder.point_embeddings.3.weight")])
    stats_file = card_path.parent / "stats" / "statistics.parquet"
    frame = pd.read_parquet(stats_file) if stats_file.exists() else None
    def cell(site: str, tensor: str, stat: str, frame: pd.DataFrame | None = frame) -> float:
        assert frame is not None
        part = frame[(frame.path == site) & (frame.tensor == tensor) & (frame.stat == stat)]
        return float(part.value.iloc[0])
    site = "mask_decoder.transformer.layers.0.cross_attn_token_to_image"

    def span(tensor: str) -> str:
        return f"[{cell(site, tensor, 'min'):.1f}, {cell(site, tensor, 'max'):.1f}]" if frame is not None else ""
    spec = card["train_spec"]
    recipe = {k: spec.get(k, "all") for k in ("decay_scope", "embedding_lr_scale", "token_init_std",
                                               "token_init_scope")}
    rows.append({"probe": name, "steps": spec["steps"], **recipe,
                 "train_iou_last": round(card["history"][-1]["iou"], 3),
                 "val_mIoU": round(100 * card["fp_metrics"]["eval/mIoU"], 1),
                 "val_gt_box_mAP": round(100 * card["fp_metrics"].get("eval/gt_box_mAP", float("nan")), 1),
                 "token_emb_rms": round(float(tok.pow(2).mean().sqrt()), 2),
                 "t2i0_tokens": span("q_in"), "t2i0_image": span("k_in"),
                 "sha256": card["checkpoint_sha256"][:12]})
df = pd.DataFrame(rows)
print("| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns))
for r in df.itertuples(index=False):
    print("| " + " | ".join(str(v) for v in r) + " |")
